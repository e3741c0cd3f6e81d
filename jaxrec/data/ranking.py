"""Recall@K and NDCG@K from top-K hit indicators: NumPy only, shared by both sides (the
surrogate's jitted full ranking in :mod:`jaxrec.metrics` and the LLM's grounding in
:mod:`llm_bridge.evaluate`)."""

from __future__ import annotations

import numpy as np


def recall_ndcg(hits: np.ndarray, n_truth: np.ndarray, ks=(10, 20)) -> dict[str, float]:
    """Mean Recall@K and NDCG@K from per-user top-K hit indicators (users with no truth are
    skipped)."""
    hits = np.asarray(hits, dtype=np.float64)
    n_truth = np.asarray(n_truth)
    keep = n_truth > 0
    hits, n_truth = hits[keep], n_truth[keep]
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    out = {}
    for k in ks:
        dcg = (hits[:, :k] * discount[:k]).sum(1)
        idcg = np.array([discount[:min(t, k)].sum() for t in n_truth])
        out[f"recall@{k}"] = float(np.mean(hits[:, :k].sum(1) / n_truth)) if len(hits) else 0.0
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg)) if len(hits) else 0.0
    return out
