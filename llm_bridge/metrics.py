"""Recall@K and NDCG@K of both backends' evaluations, and the users they are measured on.

The ground truth is the set of all the user's items in the split: ``Recall@K = hits@K /
|truth|``, ``NDCG@K = DCG@K / IDCG@K`` with the ideal DCG over ``min(|truth|, K)`` positions
(the same definitions as :mod:`jaxrec.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxrec.data.ranking import recall_ndcg
from jaxrec.errors import UserError

KS = (10, 20)


def rank_metrics(
    ranked_item_ids: Sequence[Iterable[Any]] | np.ndarray,
    truth_sets: Sequence[Iterable[Any]],
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users (paper Sec. 4.1; BIGRec's protocol).

    Args:
      ranked_item_ids: per user, item ids best first (at least ``max(ks)`` of them).
      truth_sets: per user, the set of the user's items in the split (non-empty).
      ks: cut-offs.
    Returns:
      ``{"recall@K": .., "ndcg@K": ..}`` for each K: ``recall = hits / |truth|``,
      ``ndcg = sum_{r <= K, hit} 1/log2(r+1) / sum_{r <= min(|truth|, K)} 1/log2(r+1)``.
    """
    if len(ranked_item_ids) != len(truth_sets):
        raise ValueError("one ranking per truth set")
    k_max = max(ks)
    hits = np.zeros((len(truth_sets), k_max), dtype=bool)
    n_truth = np.zeros(len(truth_sets), dtype=np.int64)
    for row, (ranked, truth) in enumerate(zip(ranked_item_ids, truth_sets)):
        truth = set(int(t) for t in truth)
        if not truth:
            raise ValueError("every user needs at least one ground-truth item")
        top = [int(i) in truth for i in list(ranked)[:k_max]]
        hits[row, : len(top)] = top
        n_truth[row] = len(truth)
    return recall_ndcg(hits, n_truth, ks)


def eval_users(ds: Any, split: str, n: int = 0, seed: int = 0) -> np.ndarray:
    """Rows of users with items in ``split``; ``n > 0`` draws a seeded subsample (sorted)."""
    if split not in ("valid", "test"):
        raise UserError(f"split must be 'valid' or 'test', not {split!r}")
    rows = np.asarray([u for u in range(ds.n_users) if len(ds.split(split)[u])], dtype=np.int64)
    if rows.size == 0:
        raise UserError(f"{ds.path}: no user has items in the {split} split")
    if n < 0:
        raise UserError(f"--users must be >= 0, got {n}")
    if 0 < n < rows.size:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    return rows
