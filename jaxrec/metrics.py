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


@jax.jit
def mask_seen(scores: jax.Array, seen: jax.Array) -> jax.Array:
    """Set the score of padding (column 0) and of each user's seen items (``seen`` ``[B, S]``,
    0-padded) to -inf."""
    rows = jnp.arange(scores.shape[0])[:, None]
    scores = scores.at[rows, seen].set(-jnp.inf)  # seen 0-padding hits column 0: fine
    return scores.at[:, 0].set(-jnp.inf)


@partial(jax.jit, static_argnames="k_max")
def topk_metrics(
    scores: jax.Array, truth: jax.Array, k_max: int = 20
) -> tuple[jax.Array, jax.Array]:
    """Per-user hit indicators of the top ``k_max`` items: ``hits [B, k_max]`` and ``n_truth``.

    ``truth`` ``[B, T]`` holds the split's items, 0-padded.
    """
    _, top = jax.lax.top_k(scores, k_max)  # [B, k_max]
    hits = jnp.any((top[:, :, None] == truth[:, None, :]) & (truth[:, None, :] > 0), -1)
    return hits, jnp.sum(truth > 0, -1)
