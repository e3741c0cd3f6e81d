"""The baselines of DEALRec's Table 2, NumPy only: random, CCS, TF-DCon, RecRanker, and a seeded
k-means. GraNd, EL2N and greedy are :func:`jaxrec.select.dealrec.top_n` on their scores.
See ``docs/selection.md`` for the exact rule of each.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from jaxrec.errors import UserError
from jaxrec.select.stratified import (
    Seed,
    Selection,
    check_n,
    check_scores,
    sample_groups,
    smallest_first_budgets,
    stratified_sample,
)


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def random_select(n_total: int, n: int, *, seed: Seed = 0) -> Selection:
    """Uniformly random ``n`` of ``n_total`` users, without replacement."""
    check_n(n, n_total)
    chosen = _rng(seed).choice(n_total, size=n, replace=False)
    return Selection(np.sort(chosen).astype(np.int64), {})


# The CCS code (github haizhongzheng/Coverage-centric-coreset-selection) takes beta as a flag,
# ``--mis-ratio``, set per pruning rate; its README's settings are 0.3 at a 90% pruning rate
# (CIFAR-10 and ImageNet) and 0.2 at 80% (ImageNet). ``ccs_beta`` is the line through them.
CCS_BETA_SLOPE_START = 0.6  # beta = max(0, pruning rate - 0.6)


def ccs_prune_count(n: int, n_total: int) -> int:
    """How many of the hardest samples CCS prunes when keeping ``n`` of ``n_total``:
    ``floor(beta * n_total)`` with ``beta = ccs_beta(n, n_total)``, in exact integer arithmetic
    (``beta * N = (1 - n/N - 0.6) N = 0.4 N - n``)."""
    check_n(n, n_total)
    return max(0, (2 * n_total - 5 * n) // 5)


def ccs_beta(n: int, n_total: int) -> float:
    """CCS's hard-cutoff rate for pruning rate ``r = 1 - n / n_total``: ``max(0, r - 0.6)``.

    Zheng et al. (ICLR 2023) tune beta per dataset and pruning rate and find it must grow with
    the rate (0 suits low rates; high rates need a larger cutoff). Their code takes it as
    ``--mis-ratio``, and the settings its README documents are beta = 0.3 at r = 0.9 (CIFAR-10,
    ImageNet) and 0.2 at r = 0.8 (ImageNet): this rule is the line through those points, with
    beta = 0 up to r = 0.6. It extrapolates above r = 0.9 (DEALRec's 1,024 of Games' users is
    r ~ 0.95: beta ~ 0.35); it never leaves fewer than ``n`` samples, since ``beta < r``.
    """
    return ccs_prune_count(n, n_total) / n_total


def ccs_select(
    el2n: ArrayLike,
    n: int,
    *,
    beta: float | None = None,
    groups: int = 50,
    seed: Seed = 0,
) -> Selection:
    """Coverage-centric coreset selection (Zheng et al., ICLR 2023) with EL2N as the importance
    score: prune the hardest ``beta`` fraction (highest EL2N; ``floor(beta * N)`` samples, ties:
    the lower row first), then stratified sampling over ``groups`` equal-width EL2N strata with
    the smallest-first budget (Algorithm 2; the CCS code's ``stratified_sampling``).

    Args:
        el2n: ``[N]`` importance scores (higher = harder).
        n: samples to keep.
        beta: hard-cutoff rate in ``[0, 1)``; ``None`` (default) = from the pruning rate,
            :func:`ccs_beta` (``max(0, 1 - n/N - 0.6)``).
    Returns:
        :class:`Selection`; ``info`` adds ``beta`` (the rate used) and ``beta_rule``.
    """
    el2n = check_scores(el2n, "el2n")
    total = el2n.size
    check_n(n, total)
    if beta is None:
        n_pruned, rule = ccs_prune_count(n, total), "rate"
    else:
        if not 0.0 <= beta < 1.0:
            raise UserError(f"beta must be in [0, 1), got beta={beta}")
        n_pruned, rule = int(np.floor(beta * total)), "fixed"
    order = np.argsort(-el2n, kind="stable")  # hardest first, ties by row
    pool = np.sort(order[n_pruned:])
    if pool.size < n:
        raise UserError(
            f"n={n} but only {pool.size} of {total} samples are left after pruning the "
            f"hardest beta={beta:g}; lower beta or n"
        )
    sel = stratified_sample(el2n[pool], n, groups=groups, hard_prune=0.0, seed=seed)
    info = {
        **sel.info,
        "beta_rule": rule,
        "beta": n_pruned / total if beta is None else float(beta),
        "n_pruned": n_pruned,
        "prune_threshold": float(el2n[order[n_pruned - 1]]) if n_pruned else None,
    }
    return Selection(pool[sel.indices], info)


# ----------------------------------------------------------------------------- k-means
def _check_features(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise UserError(f"{name} must be a non-empty [n_users, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UserError(f"{name} has non-finite values")
    return x


def _sq_dists(x: np.ndarray, x_sq: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = x_sq[:, None] - 2.0 * x @ centres.T + (centres**2).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_pp(x: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``k`` centres ``[k, d]``, each drawn
    with probability proportional to its squared distance from the closest centre so far."""
    n = x.shape[0]
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    closest = _sq_dists(x, x_sq, centres[:1])[:, 0]
    for j in range(1, k):
        total = closest.sum()
        i = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centres[j] = x[i]
        closest = np.minimum(closest, _sq_dists(x, x_sq, centres[j : j + 1])[:, 0])
    return centres


def kmeans(
    x: ArrayLike,
    k: int,
    *,
    seed: Seed = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii, 2007), seeded.

    Stops when no assignment changes, when the centres move less than ``tol`` times the mean
    feature variance (in total squared distance, as scikit-learn does), or after ``max_iter``
    rounds; an emptied cluster is re-seeded at the point farthest from its centre. ``k`` is
    capped at the number of points.
    Returns ``(labels [N] int64, centres [k, d], {"iterations", "converged", "inertia"})``.
    """
    x = _check_features(x, "features")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise UserError(f"clusters must be an integer >= 1, got {k!r}")
    rng = _rng(seed)
    n = x.shape[0]
    k = min(int(k), n)
    x_sq = (x**2).sum(1)
    centres = _kmeans_pp(x, x_sq, k, rng)
    labels = np.full(n, -1, dtype=np.int64)
    threshold = tol * float(x.var(0).mean())
    it, converged = 0, False
    for it in range(1, max_iter + 1):  # noqa: B007 (it is reported after the loop)
        d = _sq_dists(x, x_sq, centres)
        new = d.argmin(1)
        if np.array_equal(new, labels):
            converged = True
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=col, minlength=k) for col in x.T], 1)
        own = d[np.arange(n), labels]
        for empty in np.flatnonzero(counts == 0):  # re-seed an empty cluster at the farthest
            far = int(own.argmax())
            old = labels[far]
            if counts[old] <= 1:
                continue
            sums[old] -= x[far]
            counts[old] -= 1
            sums[empty], counts[empty] = x[far], 1
            labels[far], own[far] = empty, -1.0
        nonempty = counts > 0
        previous = centres.copy()
        centres[nonempty] = sums[nonempty] / counts[nonempty, None]
        if ((centres - previous) ** 2).sum() <= threshold:
            converged = True
            break
    inertia = float(_sq_dists(x, x_sq, centres)[np.arange(n), labels].sum())
    return labels, centres, {"iterations": it, "converged": converged, "inertia": inertia}


def _standardise(block: np.ndarray) -> np.ndarray:
    """Centre a feature block and scale it to unit mean squared norm per row."""
    block = block - block.mean(0)
    scale = np.sqrt((block**2).sum(1).mean())
    return block / scale if scale > 0 else block


def _cluster_info(labels: np.ndarray, k: int, counts: np.ndarray, extra: dict) -> dict:
    sizes = np.bincount(labels, minlength=k)
    return {"cluster_sizes": sizes.tolist(), "cluster_selected": counts.tolist(), **extra}


def tfdcon_select(
    representations: ArrayLike,
    n: int,
    *,
    clusters: int = 50,
    seed: Seed = 0,
    llm_representations: ArrayLike | None = None,
) -> Selection:
    """TF-DCon-style user condensation (Wu et al., 2024), as adapted here.

    Features: the surrogate's user representations (and, if given, the LLM's), each block
    centred and scaled to unit mean squared row norm, concatenated. Users are clustered with
    seeded :func:`kmeans`; the budget is spread evenly over the clusters with the smallest-first
    rule of Algorithm 2 (a small cluster gives its unused share to the larger ones) and members
    are drawn uniformly at random within each cluster.
    """
    feats = [_standardise(_check_features(representations, "representations"))]
    if llm_representations is not None:
        llm = _check_features(llm_representations, "LLM representations")
        if llm.shape[0] != feats[0].shape[0]:
            raise UserError(
                f"LLM representations have {llm.shape[0]} rows, surrogate "
                f"representations {feats[0].shape[0]}"
            )
        feats.append(_standardise(llm))
    x = np.concatenate(feats, axis=1)
    check_n(n, x.shape[0])
    rng = _rng(seed)
    labels, centres, stats = kmeans(x, clusters, seed=rng)
    k = centres.shape[0]
    sizes = np.bincount(labels, minlength=k)
    counts = smallest_first_budgets(sizes, n)
    chosen = sample_groups(labels, sizes, counts, rng)
    return Selection(chosen, _cluster_info(labels, k, counts, stats))


def proportional_budgets(sizes: ArrayLike, n: int) -> np.ndarray:
    """Largest-remainder apportionment of ``n`` over groups in proportion to ``sizes``
    (ties in the remainder: the lower group first). Never exceeds a group's size when
    ``n <= sum(sizes)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = n * sizes / sizes.sum()
    counts = np.floor(quota).astype(np.int64)
    rest = n - int(counts.sum())
    order = np.argsort(-(quota - counts), kind="stable")[:rest]
    counts[order] += 1
    return counts


def recranker_select(
    representations: ArrayLike,
    interactions: ArrayLike,
    n: int,
    *,
    clusters: int = 50,
    seed: Seed = 0,
) -> Selection:
    """RecRanker-style adaptive user sampling (Luo et al., 2023), as adapted here.

    Clustering-based sampling for diversity: users are clustered on the surrogate's
    representations (seeded :func:`kmeans`) and each cluster gets a share of ``n`` proportional
    to its size (:func:`proportional_budgets`). Importance-aware sampling inside a cluster:
    members are drawn without replacement with probability proportional to
    ``log(1 + interactions)``, so users with more interactions are favoured. (RecRanker's
    repetition penalty is moot: no user is drawn twice.)
    """
    x = _standardise(_check_features(representations, "representations"))
    inter = check_scores(interactions, "interactions")
    if inter.size != x.shape[0]:
        raise UserError(f"interactions has {inter.size} rows, representations {x.shape[0]}")
    if (inter < 0).any():
        raise UserError("interactions must be >= 0")
    check_n(n, x.shape[0])
    rng = _rng(seed)
    labels, centres, stats = kmeans(x, clusters, seed=rng)
    k = centres.shape[0]
    sizes = np.bincount(labels, minlength=k)
    counts = proportional_budgets(sizes, n)
    weight = np.log1p(inter) + 1e-12  # a user with no interactions is still drawable
    chosen = []
    for g in range(k):
        if counts[g] == 0:
            continue
        members = np.flatnonzero(labels == g)
        p = weight[members] / weight[members].sum()
        chosen.append(rng.choice(members, size=int(counts[g]), replace=False, p=p))
    out = np.sort(np.concatenate(chosen).astype(np.int64))
    return Selection(out, _cluster_info(labels, k, counts, stats))
