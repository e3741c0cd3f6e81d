"""DEALRec's selection: overall score (paper Eq. 13) + coverage-enhanced sampling (Algorithm 2).

NumPy only, so it runs (and is tested) without JAX or PyTorch.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from jaxrec.errors import UserError
from jaxrec.select.stratified import Seed, Selection, check_n, check_scores, stratified_sample


def minmax(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Min-max normalise to ``[0, 1]`` (the paper's code, before Eq. 13). A constant array maps
    to zeros (the paper's code would divide by zero)."""
    scores = check_scores(scores, name)
    lo, hi = scores.min(), scores.max()
    if hi == lo:
        return np.zeros_like(scores)
    return (scores - lo) / (hi - lo)


def overall_scores(influence: ArrayLike, effort: ArrayLike, lamda: float = 0.3) -> np.ndarray:
    """Paper Eq. 13: ``S = minmax(I) + lamda * minmax(delta)``, the influence score ``I``
    (Eq. 11) regularised by the LLM effort score ``delta`` (Eq. 12)."""
    infl = minmax(influence, "influence")
    eff = minmax(effort, "effort")
    if infl.shape != eff.shape:
        raise UserError(f"influence has {infl.size} scores but effort has {eff.size}")
    return infl + float(lamda) * eff


def dealrec_select(
    influence: ArrayLike,
    effort: ArrayLike,
    n: int,
    *,
    lamda: float = 0.3,
    groups: int = 50,
    hard_prune: float = 0.1,
    seed: Seed = 0,
) -> Selection:
    """DEALRec: Eq. 13 overall score, then Algorithm 2 on it (see :func:`stratified_sample`)."""
    return stratified_sample(
        overall_scores(influence, effort, lamda), n, groups=groups, hard_prune=hard_prune, seed=seed
    )


def top_n(scores: ArrayLike, n: int) -> Selection:
    """The ``n`` highest scores (ties: the lower row first); used by greedy, GraNd and EL2N."""
    scores = check_scores(scores)
    check_n(n, scores.size)
    chosen = np.argsort(-scores, kind="stable")[:n]
    return Selection(np.sort(chosen).astype(np.int64), {"threshold": float(scores[chosen[-1]])})


def greedy_select(
    influence: ArrayLike, effort: ArrayLike, n: int, *, lamda: float = 0.3
) -> Selection:
    """Greedy: the top ``n`` users by the Eq. 13 overall score (no pruning, no strata)."""
    return top_n(overall_scores(influence, effort, lamda), n)
