"""Full-ranking metrics, jitted: Recall@K and NDCG@K over all items.

For each user, every item is scored; the items the user already had (train, and valid for
test) are masked with -inf; the ground truth is the set of the user's items in the split.
``Recall@K = hits / |truth|``; ``NDCG@K = DCG / IDCG`` with the ideal DCG over
``min(|truth|, K)`` positions.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def mask_seen(scores, seen):
    """Set the score of padding (column 0) and of each user's seen items (``seen`` ``[B, S]``,
    0-padded) to -inf."""
    rows = jnp.arange(scores.shape[0])[:, None]
    scores = scores.at[rows, seen].set(-jnp.inf)      # seen 0-padding hits column 0: fine
    return scores.at[:, 0].set(-jnp.inf)


@partial(jax.jit, static_argnames="k_max")
def topk_metrics(scores, truth, k_max: int = 20):
    """Per-user hit indicators of the top ``k_max`` items: ``hits [B, k_max]`` and ``n_truth``.

    ``truth`` ``[B, T]`` holds the split's items, 0-padded.
    """
    _, top = jax.lax.top_k(scores, k_max)                                   # [B, k_max]
    hits = jnp.any((top[:, :, None] == truth[:, None, :]) & (truth[:, None, :] > 0), -1)
    return hits, jnp.sum(truth > 0, -1)


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
