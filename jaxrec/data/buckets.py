"""Length buckets: rows grouped by their number of target positions and cut to a width.

SASRec gives identical numbers at any width that holds a user's sequence (positions count from
the right, padding is masked), and most Games users have fewer than 8 items, so cutting each
bucket to the narrowest width that holds it is most of the speed of training and scoring.
NumPy only. Training and the influence stage use the same rule, with different width lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

# Training: one compilation per width per epoch is cheap next to 100+ epochs.
TRAIN_WIDTHS = (8, 16, 32, 50)
# Scoring (influence, GraNd, EL2N): every extra bucket costs one more compilation of each jitted
# function (mean gradient, the LiSSA switch branch, scores), which on a CPU outweighs the padding
# it saves (measured on Games: 8/16/32/50 took 65 s, 8/50 57 s).
SCORE_WIDTHS = (8, 50)
KEYS = ("inputs", "targets", "negatives")


def bucket_widths(max_len: int, widths: Sequence[int] = SCORE_WIDTHS) -> list[int]:
    """The sorted widths actually used: each capped at ``max_len``, plus ``max_len`` itself."""
    return sorted({min(int(w), max_len) for w in widths} | {max_len})


def width_of(lengths: ArrayLike, max_len: int, widths: Sequence[int] = SCORE_WIDTHS) -> np.ndarray:
    """The narrowest width of :func:`bucket_widths` that holds each length (``[n]`` ints)."""
    ws = np.asarray(bucket_widths(max_len, widths))
    idx = np.searchsorted(ws, np.minimum(np.asarray(lengths), max_len))
    return ws[idx]


def target_lengths(data: dict) -> np.ndarray:
    """Number of target positions of each row (``targets > 0``), or of input positions where
    a row has more (BERT4Rec's cloze rows target only their masked items): the width a row
    needs."""
    targets = (np.asarray(data["targets"]) > 0).sum(1)
    return np.maximum(targets, (np.asarray(data["inputs"]) > 0).sum(1))


def width_strata(
    data: dict,
    max_len: int,
    widths: Sequence[int] = SCORE_WIDTHS,
    keys: Sequence[str] = KEYS,
) -> tuple[np.ndarray, list[dict]]:
    """Split rows into buckets by number of target positions, each cut to its width.

    Returns ``(order, parts)``: ``parts[g]`` holds rows ``order[start_g:end_g]`` (the parts
    concatenated are ``data[order]``), cut to their last ``w_g`` columns. Empty buckets are
    left out.
    """
    width = width_of(target_lengths(data), max_len, widths)
    order, parts = [], []
    for w in bucket_widths(max_len, widths):
        rows = np.flatnonzero(width == w)
        if rows.size:
            order.append(rows)
            parts.append({k: np.ascontiguousarray(np.asarray(data[k])[rows, -w:]) for k in keys})
    return np.concatenate(order), parts
