"""Few-shot subset selection: DEALRec (paper Eq. 13 + Algorithm 2) and its baselines.

NumPy only: nothing here (nor in :mod:`jaxrec.select.cli`) imports JAX or PyTorch. Surrogate
scores and representations are score files that ``dealrec influence --score KIND`` writes
(:func:`score_stages` lists those a method needs). The one entry point is :func:`select`::

    sel = select("dealrec", 1024, influence=infl, effort=eff, lamda=0.3, groups=50,
                 hard_prune=0.1, seed=0)
    sel.indices   # exactly 1024 distinct int64 rows of sequential_train.txt, sorted
    sel.info      # group edges / sizes / selected counts (or cluster sizes), JSON-ready
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from jaxrec.errors import UserError
from jaxrec.select.baselines import (
    ccs_beta,
    ccs_prune_count,
    ccs_select,
    kmeans,
    proportional_budgets,
    random_select,
    recranker_select,
    tfdcon_select,
)
from jaxrec.select.dealrec import dealrec_select, greedy_select, minmax, overall_scores, top_n
from jaxrec.select.stratified import (
    Selection,
    sample_groups,
    smallest_first_budgets,
    stratified_sample,
)

# method -> the inputs it needs (keyword arguments of select)
REQUIRES = {
    "dealrec": ("influence", "effort"),
    "random": (),
    "grand": ("grand",),
    "el2n": ("el2n",),
    "ccs": ("el2n",),
    "tfdcon": ("representations",),
    "recranker": ("representations", "interactions"),
    "greedy": ("influence", "effort"),
    "influence-only": ("influence",),
    "effort-only": ("effort",),
    "all": (),  # every user: full fine-tuning (paper Table 3); n is ignored
}
METHODS = tuple(REQUIRES)
# input -> (score kind of ``dealrec influence --score KIND``, its file name in the surrogate run)
SURROGATE_FILES = {
    "grand": ("grand", "grand.npy"),
    "el2n": ("el2n", "el2n.npy"),
    "representations": ("representation", "user_representations.npy"),
}


def score_stages(methods: Iterable[str]) -> list[tuple[str, str]]:
    """``[(kind, file name)]`` of the surrogate score files that ``methods`` need, in a fixed
    order, each once: the ``dealrec influence --score KIND --out RUN/FILE`` runs to make."""
    needed = {name for m in methods for name in REQUIRES[m]}
    return [SURROGATE_FILES[name] for name in SURROGATE_FILES if name in needed]


def check_method(method: str) -> None:
    if method not in REQUIRES:
        raise UserError(f"unknown method {method!r} (known: {', '.join(METHODS)})")


def select(
    method: str,
    n: int,
    *,
    seed: int = 0,
    n_total: int | None = None,
    influence: np.ndarray | None = None,
    effort: np.ndarray | None = None,
    grand: np.ndarray | None = None,
    el2n: np.ndarray | None = None,
    representations: np.ndarray | None = None,
    llm_representations: np.ndarray | None = None,
    interactions: np.ndarray | None = None,
    lamda: float = 0.3,
    groups: int = 50,
    hard_prune: float = 0.1,
    beta: float | None = None,
    clusters: int = 50,
    eligible: np.ndarray | None = None,
) -> Selection:
    """Choose ``n`` training users with ``method`` (one of :data:`METHODS`).

    Inputs are per-user arrays aligned with ``sequential_train.txt``: ``influence`` (Eq. 11),
    ``effort`` (Eq. 12), ``grand`` / ``el2n`` (surrogate scores), ``representations``
    ``[N, H]`` (surrogate), ``llm_representations`` ``[N, D]`` (optional, tfdcon),
    ``interactions`` ``[N]`` (train items per user, recranker). ``n_total`` is needed by
    ``random`` only when no array is given. ``beta``: CCS's hard-cutoff rate; ``None`` = from
    the pruning rate (:func:`~jaxrec.select.baselines.ccs_beta`). ``eligible`` ``[N]`` bool
    (``Dataset.has_sample``): only these users can be chosen, and ``n`` counts among them;
    the method sees only their rows (the paper's datasets keep no user without a training
    sample, so this departs from no result of the paper). Returns exactly ``n`` distinct
    sorted indices.
    """
    check_method(method)
    given = {
        "influence": influence,
        "effort": effort,
        "grand": grand,
        "el2n": el2n,
        "representations": representations,
        "interactions": interactions,
        "llm_representations": llm_representations,
    }
    options = Options(seed, lamda, groups, hard_prune, beta, clusters)
    if eligible is not None and not np.all(eligible):
        return _among(eligible, method, n, given, options)
    total = _n_users(method, given, n_total)
    return _dispatch(method, n, total, given, options)


class Options(NamedTuple):
    """The options of :func:`select` that are not per-user arrays."""

    seed: int
    lamda: float
    groups: int
    hard_prune: float
    beta: float | None
    clusters: int


def _n_users(method: str, given: dict[str, np.ndarray | None], n_total: int | None) -> int:
    """The number of users the inputs agree on; a :class:`UserError` when ``method`` lacks
    an input or the inputs disagree."""
    for name in REQUIRES[method]:
        if given[name] is None:
            raise UserError(f"method {method!r} needs {name}")
    lengths = {name: len(v) for name, v in given.items() if v is not None}
    if n_total is not None:
        lengths["n_total"] = int(n_total)
    if len(set(lengths.values())) > 1:
        raise UserError(
            "inputs disagree on the number of users: "
            + ", ".join(f"{k}={v}" for k, v in lengths.items())
        )
    if not lengths:
        raise UserError(f"method {method!r} needs n_total")
    return next(iter(lengths.values()))


def _dispatch(method: str, n: int, total: int, given: dict[str, Any], o: Options) -> Selection:
    """:func:`select` by ``method`` on checked inputs of ``total`` users."""
    influence, effort = given["influence"], given["effort"]
    if method == "dealrec":
        return dealrec_select(
            influence,
            effort,
            n,
            lamda=o.lamda,
            groups=o.groups,
            hard_prune=o.hard_prune,
            seed=o.seed,
        )
    if method == "greedy":
        return greedy_select(influence, effort, n, lamda=o.lamda)
    if method in ("influence-only", "effort-only"):
        name = method.removesuffix("-only")
        return stratified_sample(
            minmax(given[name], name), n, groups=o.groups, hard_prune=o.hard_prune, seed=o.seed
        )
    if method == "random":
        return random_select(total, n, seed=o.seed)
    if method == "all":
        return Selection(np.arange(total, dtype=np.int64), {"all_users": True})
    if method in ("grand", "el2n"):
        return top_n(given[method], n)
    if method == "ccs":
        return ccs_select(given["el2n"], n, beta=o.beta, groups=o.groups, seed=o.seed)
    if method == "tfdcon":
        return tfdcon_select(
            given["representations"],
            n,
            clusters=o.clusters,
            seed=o.seed,
            llm_representations=given["llm_representations"],
        )
    return recranker_select(
        given["representations"], given["interactions"], n, clusters=o.clusters, seed=o.seed
    )


def _among(
    eligible: np.ndarray,
    method: str,
    n: int,
    given: dict[str, np.ndarray | None],
    options: Options,
) -> Selection:
    """:func:`select` on the ``eligible`` rows only, its indices mapped back to all rows."""
    rows = np.flatnonzero(np.asarray(eligible, bool))
    if rows.size == 0:
        raise UserError("no user has a training sample: nothing can be selected")
    sub: dict[str, Any] = {k: None if v is None else np.asarray(v)[rows] for k, v in given.items()}
    sel = select(method, n, n_total=rows.size, **options._asdict(), **sub)
    info = {
        **sel.info,
        "eligible_users": int(rows.size),
        "users_without_sample": int(len(eligible) - rows.size),
    }
    return Selection(np.sort(rows[sel.indices]).astype(np.int64), info)


__all__ = [
    "METHODS",
    "REQUIRES",
    "SURROGATE_FILES",
    "score_stages",
    "Selection",
    "select",
    "check_method",
    "overall_scores",
    "minmax",
    "stratified_sample",
    "smallest_first_budgets",
    "sample_groups",
    "dealrec_select",
    "greedy_select",
    "top_n",
    "random_select",
    "ccs_select",
    "ccs_beta",
    "ccs_prune_count",
    "tfdcon_select",
    "recranker_select",
    "kmeans",
    "proportional_budgets",
]
