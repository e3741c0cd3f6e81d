"""Per-sample gradient norms of a linear map from its inputs and output gradients: the one
ghost-norm function of both backends' effort scores (paper Eq. 12).

A linear map ``y = x W^T`` applied to sample ``b``'s ``T`` positions has the per-sample weight
gradient ``G_b^T X_b`` (``X_b [T, d_in]`` its inputs, ``G_b [T, d_out]`` the gradients of its
outputs). Its squared Frobenius norm is computed either explicitly, ``||G_b^T X_b||^2``
(``T * d_in * d_out`` multiply-adds per sample, a ``[d_out, d_in]`` buffer), or as the "ghost
norm" ``<X_b X_b^T, G_b G_b^T>`` (Goodfellow 2015; Li et al. 2022: ``T * T * (d_in + d_out)``
multiply-adds, two ``[T, T]`` buffers), whichever needs fewer multiply-adds
(:func:`use_ghost`; the rule measured in docs/benchmarks.md, "Ghost norm: one cost rule").
"""

from __future__ import annotations

import torch


def use_ghost(t: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost norm is cheaper than the explicit gradient for ``T = t`` positions of
    a ``d_in -> d_out`` map: fewer multiply-adds, ``t * t * (d_in + d_out) < t * d_in * d_out``,
    i.e. ``d_in * d_out > t * (d_in + d_out)``."""
    return d_in * d_out > t * (d_in + d_out)


def linear_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared Frobenius norms of the per-sample weight gradients ``G_b^T X_b``.

    Args:
      x: ``[B, T, d_in]`` inputs of the map (padding rows zero).
      g: ``[B, T, d_out]`` gradients of its outputs.
    Returns:
      ``[B]`` ``||G_b^T X_b||_F^2`` (in ``x``'s dtype), explicit or by the ghost norm
      ``<X_b X_b^T, G_b G_b^T>``, whichever :func:`use_ghost` says is cheaper.
    """
    t, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
    if use_ghost(t, d_in, d_out):
        return (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), x).pow(2).sum((1, 2))
