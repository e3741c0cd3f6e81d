"""Recall@K and NDCG@K from top-K hit indicators: NumPy only, shared by both sides (the
surrogate's jitted full ranking in :mod:`jaxrec.metrics`, the LLM's grounding in
:mod:`llm_bridge.evaluate`, TIGER's beam search and the experiment's per-user tests)."""

from __future__ import annotations

import numpy as np
from collections.abc import Sequence


def per_user_recall_ndcg(
    hits: np.ndarray, n_truth: np.ndarray, ks: Sequence[int] = (10, 20)
) -> dict[str, np.ndarray]:
    """Recall@K and NDCG@K of every user (paper Sec. 4.1).

    Args:
      hits: ``[n_users, >= max(ks)]`` whether the item at rank ``r`` is one of the user's truth.
      n_truth: ``[n_users]`` size of each user's truth set (all must be > 0).
      ks: cut-offs.
    Returns:
      ``{"recall@K": [n_users], "ndcg@K": [n_users]}``: ``recall = hits@K / |truth|``,
      ``ndcg = sum_{r <= K, hit} 1/log2(r+1) / sum_{r <= min(|truth|, K)} 1/log2(r+1)``.
    """
    hits = np.asarray(hits, dtype=np.float64)
    n_truth = np.asarray(n_truth)
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    ideal = np.concatenate([[0.0], np.cumsum(discount)])
    out = {}
    for k in ks:
        out[f"recall@{k}"] = hits[:, :k].sum(1) / n_truth
        out[f"ndcg@{k}"] = (hits[:, :k] * discount[:k]).sum(1) / ideal[np.minimum(n_truth, k)]
    return out


def recall_ndcg(
    hits: np.ndarray, n_truth: np.ndarray, ks: Sequence[int] = (10, 20)
) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users (users with no truth are skipped); see
    :func:`per_user_recall_ndcg`."""
    hits = np.asarray(hits)
    n_truth = np.asarray(n_truth)
    keep = n_truth > 0
    if not keep.any():
        return {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    per_user = per_user_recall_ndcg(hits[keep], n_truth[keep], ks)
    return {name: float(v.mean()) for name, v in per_user.items()}
