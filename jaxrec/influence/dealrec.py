"""DEALRec's influence score of every training user (paper Eq. 9-11, Algorithm 1) under the
typed options of ``dealrec influence`` (:class:`jaxrec.config.InfluenceConfig`).

One function, :func:`dealrec_scores`, is what the pipeline's ``influence`` stage
(``jaxrec.influence.cli``) and ``dealrec lds``'s ``dealrec`` row both run, so the two score
users with the same losses, negative draws and solver::

    loss, per_sample_loss = jaxrec.train.loss_fns(cfg, model, arrays)   # training loss
    sample_loss = jaxrec.models.sample_loss(model)                       # per-user loss
    draw = jaxrec.train.negative_draw(cfg, arrays, dataset)              # k -> negatives
    scores, info = dealrec_scores(loss, per_sample_loss, sample_loss, params, data,
                                  InfluenceConfig(), draw=draw)

It is pure in the engine's sense: functions, parameters and arrays in, scores out.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from jaxrec.base import ArrayLike, Loss, Params, PerSampleLoss
from jaxrec.config import InfluenceConfig, solver_options
from jaxrec.influence_options import LissaOptions
from jaxrec.data.buckets import bucket_widths, width_strata
import jaxrec.influence.hosts as hosts
from jaxrec.influence.batching import Strata
from jaxrec.influence.params import ParamSubset
from jaxrec.influence.scores import influence_scores


def dealrec_scores(
    loss: Loss,
    per_sample_loss: PerSampleLoss,
    sample_loss: PerSampleLoss,
    params: Params,
    data: dict,
    cfg: InfluenceConfig,
    *,
    draw: Callable[[int], np.ndarray] | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """DEALRec's influence score of every user (paper Eq. 11,
    ``s_i = g_i . H^-1 g_mean / n^2``), in user order.

    ``g_mean`` (Eq. 9's mean gradient) and ``H`` (the HVPs of the inverse, Eq. 10) are those of
    the training loss; ``g_i`` is the gradient of ``sample_loss`` under ``cfg.sample_loss ==
    "per-user"`` (the paper code's ``get_sample_loss``: the user's own loss on a batch of one)
    or of ``per_sample_loss`` under ``"training"``. With ``cfg.negative_draws = K > 1`` (and a
    ``draw``) every loss is averaged over K fixed draws of negatives
    (:func:`draw_mean_losses`); the official code draws fresh negatives at every loss
    evaluation instead (docs/protocol.md).

    Args:
      loss, per_sample_loss: the training loss pair, ``(params, batch) -> scalar`` / ``[B]``.
      sample_loss: the per-user loss ``(params, batch) -> [B]``
        (:func:`jaxrec.models.sample_loss`).
      params: the full parameter tree; ``cfg.params`` picks the block differentiated
        (:class:`~jaxrec.influence.ParamSubset`).
      data: one row per user, in user order: ``inputs``, ``targets``, ``negatives`` ``[n, L]``
        (the negatives of draw 0), split into length buckets here
        (:func:`jaxrec.data.buckets.width_strata`).
      cfg: reads ``params``, ``sample_loss``, ``negative_draws``, ``negative_seed``,
        ``solver`` and its options, ``damping``, ``convention``, ``scale``, ``batch_size``.
      draw: ``k -> [n, L]``, the negatives of draw ``k`` (draws ``negative_seed + j``, ``j <
        K``; draw 0 must be ``data["negatives"]``); ``None`` for a loss without sampled
        negatives (BERT4Rec), scored on ``data`` as given.
    Returns:
      ``(scores [n], info)``; ``info``: ``params`` (the block's pattern), ``n_params``,
      ``seconds`` (per stage) and ``solver`` (the solver's report, ``negative_draws``,
      ``sample_loss``).

    Long because of its Args/Returns documentation; the code is one straight path.
    """
    if cfg.sample_loss not in ("per-user", "training"):
        raise ValueError(f"sample_loss must be 'per-user' or 'training', got {cfg.sample_loss!r}")
    sub = ParamSubset(params, cfg.params)
    order, parts = width_strata(data, np.asarray(data["inputs"]).shape[1])
    if hosts.multi():
        parts = every_bucket(parts, np.asarray(data["inputs"]).shape[1])
    loss, psl = sub.restrict(loss), sub.restrict(per_sample_loss)
    score_loss = sub.restrict(sample_loss) if cfg.sample_loss == "per-user" else psl
    options, batch_size = solver_options(cfg), cfg.batch_size
    draws = cfg.negative_draws if draw is not None else 1
    if draw is not None and (draws > 1 or cfg.negative_seed != 0):
        offsets = [cfg.negative_seed + k for k in range(draws)]
        parts = draw_parts(order, parts, draw, offsets)
        loss, psl = draw_mean_losses(psl)
        score_loss = draw_mean_losses(score_loss)[1]
        options, batch_size = draw_batches(options, batch_size, draws)
    s, solver = influence_scores(
        loss,
        psl,
        sub.params,
        Strata(parts, order),
        solver=options,
        damping=cfg.damping,
        convention=cfg.convention,
        scale=cfg.scale,
        batch_size=batch_size,
        sample_loss=score_loss,
        progress=progress,
    )
    seconds = solver.pop("seconds")
    seconds.pop("total", None)
    solver.update(negative_draws=draws, sample_loss=cfg.sample_loss)
    info = {"params": sub.pattern, "n_params": sub.size, "seconds": seconds, "solver": solver}
    return s, info  # in user order: the Strata put it back


def every_bucket(parts: list[dict], max_len: int) -> list[dict]:
    """Under JAX's multi-process runtime: ``parts`` (this process's width buckets, empty ones
    left out by :func:`~jaxrec.data.buckets.width_strata`) with an empty part for each bucket
    that another process holds, so every process lists the same buckets in the same order
    (LiSSA's minibatch draw indexes them; :mod:`jaxrec.influence.lissa`)."""
    widths = bucket_widths(max_len)
    have = {p["inputs"].shape[1]: p for p in parts}
    table = hosts.allgather([w in have for w in widths])  # [P, buckets]
    anywhere = [bool(table[:, j].any()) for j in range(len(widths))]
    like = parts[0]
    return [
        have.get(w) or {k: np.zeros((0, w, *x.shape[2:]), x.dtype) for k, x in like.items()}
        for w, used in zip(widths, anywhere)
        if used
    ]


def draw_parts(
    order: ArrayLike, parts: list[dict], draw: Callable, offsets: list[int]
) -> list[dict]:
    """``parts`` (the width buckets of :func:`~jaxrec.data.buckets.width_strata`, rows
    ``order``) with ``negatives`` replaced by ``[B, K, w]``: draw ``offsets[k]``'s negatives
    (``draw(offset) -> [n, L]``), cut like ``parts``.

    Each draw is written into the ``[B, K, w]`` arrays as it is made, so memory is the result
    plus one draw (keeping every draw until a final stack held K copies)."""
    rows = np.split(np.asarray(order), np.cumsum([len(p["negatives"]) for p in parts])[:-1])
    out = [
        np.empty((len(p["negatives"]), len(offsets), p["negatives"].shape[1]), p["negatives"].dtype)
        for p in parts
    ]
    for k, offset in enumerate(offsets):
        neg = np.asarray(draw(offset))
        for g, (r, p) in enumerate(zip(rows, parts)):
            out[g][:, k] = neg[r, neg.shape[1] - p["negatives"].shape[1] :]
        del neg
    return [{**part, "negatives": neg} for part, neg in zip(parts, out)]


def draw_batches(options: Any, batch_size: int, draws: int) -> tuple[Any, int]:
    """``(options, batch_size)`` for K-draw batches: the full-data batches (JVP scores, mean
    gradient, and the CG / exact / Arnoldi HVPs) hold ``batch_size // K`` users (at least 1),
    so a batch holds as many (user, draw) losses, and as much memory, as a one-draw batch of
    ``batch_size``. LiSSA's minibatch (16 users) is left as it is: its HVP sees all K draws of
    each of its users."""
    users = max(1, batch_size // draws)
    if not isinstance(options, LissaOptions):
        options = dataclasses.replace(options, batch_size=max(1, options.batch_size // draws))
    return options, users


@functools.lru_cache(maxsize=8)
def draw_mean_losses(per_sample_loss: PerSampleLoss) -> tuple[Loss, PerSampleLoss]:
    """``(loss, per_sample_loss)`` averaged over negative draws: batches carry ``negatives``
    ``[B, K, w]`` and sample ``i``'s loss is ``(1/K) sum_k L_i(theta; negatives[:, k])``.

    The K-draw influence (``--negative-draws K``) is paper Eq. 11 for this averaged loss: the
    mean gradient, the Hessian (HVPs) and the per-sample gradients are all means over the K
    fixed draws. (It is not the mean of K single-draw influence scores: the inverse Hessian of
    a mean is not the mean of the inverses.) ``vmap`` over the draws leaves the sequence
    encoder, which does not depend on the negatives, unbatched: it runs once per batch. The
    same function object comes back for the same ``per_sample_loss`` (jit caches hit).
    """

    def mean_psl(params, batch):
        def one(neg):
            return per_sample_loss(params, {**batch, "negatives": neg})

        return jnp.mean(jax.vmap(one, in_axes=1)(batch["negatives"]), axis=0)

    def loss(params, batch):
        return jnp.mean(mean_psl(params, batch))

    return loss, mean_psl
