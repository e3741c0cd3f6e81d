"""Coverage-enhanced stratified sampling (paper Algorithm 2), NumPy only.

The scores are split into ``K`` groups of equal score width; the groups are then visited from
the smallest to the largest, and each gets ``min(|group|, remaining_n // remaining_groups)``
samples drawn uniformly at random, so sparse score regions are covered and the budget left over
by small groups flows to the larger ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike

from jaxrec.errors import UserError

#: a seed, or a NumPy generator to draw from
Seed: TypeAlias = int | np.random.Generator


@dataclass(frozen=True)
class Selection:
    """A chosen subset: ``indices`` are distinct int64 row numbers of ``sequential_train.txt``,
    sorted ascending; ``info`` is JSON-ready detail for the manifest and the plots (group edges,
    sizes and selected counts for the stratified methods, cluster sizes for the clustered ones)."""

    indices: np.ndarray
    info: dict = field(default_factory=dict)


def check_n(n: int, n_total: int) -> None:
    """Raise :class:`UserError` unless ``1 <= n <= n_total``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise UserError(f"n must be an integer, got {n!r}")
    if n <= 0:
        raise UserError(f"n must be >= 1, got {n}")
    if n > n_total:
        raise UserError(f"n={n} is larger than the dataset ({n_total} users)")


def check_scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a finite 1-D float64 array, else raise :class:`UserError`."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise UserError(f"{name} must be a non-empty 1-D array, got shape {scores.shape}")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise UserError(
            f"{name} has {int(bad.sum())} non-finite values "
            f"(first at row {int(np.flatnonzero(bad)[0])})"
        )
    return scores


def smallest_first_budgets(sizes: ArrayLike, n: int) -> np.ndarray:
    """How many samples each group gets under Algorithm 2's budget rule.

    Non-empty groups are visited by increasing size (ties: lower group index first); each takes
    ``min(size, remaining_n // remaining_groups)``. Returns ``counts`` aligned with ``sizes``.
    When ``sum(sizes) >= n`` the counts sum to exactly ``n``: a group that takes less than the
    even share ``q`` leaves the rest to groups at least as large, and a group that takes ``q``
    leaves ``m - q <= (r - 1)(q + 1)`` for ``r - 1`` groups of size ``>= q + 1``; the last group
    takes all that is left. (The paper's code returns fewer only when the pool is smaller than
    ``n``, or when round-off puts the top score above its last edge; both are excluded here.)
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = np.zeros_like(sizes)
    order = [int(g) for g in np.argsort(sizes, kind="stable") if sizes[g] > 0]
    remaining = int(n)
    for visited, g in enumerate(order):
        budget = min(int(sizes[g]), remaining // (len(order) - visited))
        counts[g] = budget
        remaining -= budget
    return counts


def sample_groups(
    labels: np.ndarray,
    sizes: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``counts[g]`` distinct members of each group ``g`` uniformly at random.

    Groups are drawn in the order :func:`smallest_first_budgets` visits them, so a seed fixes the
    result. ``labels[i]`` is the group of ``rows[i]`` (default ``rows = arange``). Returns the
    selected rows, sorted.
    """
    rows = np.arange(len(labels), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    by_group = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chosen = []
    for g in np.argsort(sizes, kind="stable"):
        if counts[g] == 0:
            continue
        members = rows[by_group[starts[g] : starts[g + 1]]]
        chosen.append(rng.choice(members, size=int(counts[g]), replace=False))
    out = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return np.sort(out.astype(np.int64))


def stratified_sample(
    scores: ArrayLike,
    n: int,
    *,
    groups: int = 50,
    hard_prune: float = 0.1,
    seed: Seed = 0,
) -> Selection:
    """Coverage-enhanced sample selection (paper Algorithm 2, as the paper's code does it).

    1. Drop the ``floor(hard_prune * N)`` highest-scoring samples (ties: the lower row first).
    2. Split the remaining score range ``[lo, hi]`` into ``groups`` bins of equal width; bin
       ``k`` holds scores in ``(lo + k w, lo + (k + 1) w]`` (the first also holds ``lo``; the
       last edge is exactly ``hi``). If ``lo == hi`` every sample is in the first bin.
    3. Budgets by :func:`smallest_first_budgets`, members drawn by :func:`sample_groups`.

    Returns exactly ``n`` distinct indices; raises :class:`UserError` if fewer than ``n`` samples
    survive the hard pruning (hard-pruned samples are never selected).
    """
    scores = check_scores(scores)
    total = scores.size
    check_n(n, total)
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups <= 0:
        raise UserError(f"groups must be an integer >= 1, got {groups!r}")
    if not 0.0 <= hard_prune < 1.0:
        raise UserError(f"hard_prune must be in [0, 1), got {hard_prune}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    n_pruned = int(np.floor(hard_prune * total))
    order = np.argsort(-scores, kind="stable")  # highest first, ties by row
    pool = np.sort(order[n_pruned:])
    if pool.size < n:
        raise UserError(
            f"n={n} but only {pool.size} of {total} samples are left after hard "
            f"pruning {hard_prune:g}; lower hard_prune or n"
        )
    s = scores[pool]
    lo, hi = float(s.min()), float(s.max())
    edges = np.minimum(lo + (hi - lo) / groups * np.arange(groups + 1), hi)
    edges[0], edges[-1] = lo, hi
    # group k = first k with s <= edges[k + 1] (the paper's "if s <= ref: break")
    labels = np.minimum(np.searchsorted(edges[1:], s, side="left"), groups - 1)
    sizes = np.bincount(labels, minlength=groups)
    counts = smallest_first_budgets(sizes, n)
    chosen = sample_groups(labels, sizes, counts, rng, rows=pool)
    if chosen.size != n:  # pragma: no cover - smallest_first_budgets proves this cannot happen
        raise AssertionError(f"stratified sampling chose {chosen.size}, expected {n}")
    info = {
        "n_pruned": n_pruned,
        "prune_threshold": float(scores[order[n_pruned - 1]]) if n_pruned else None,
        "edges": edges.tolist(),
        "group_sizes": sizes.tolist(),
        "group_selected": counts.tolist(),
    }
    return Selection(chosen, info)
