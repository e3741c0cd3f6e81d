"""Retraining a surrogate on subsets of its users, the LDS study's retrains (issue 27, section 3).

:class:`SurrogateTask` holds what a retrain needs (model, pure loss pair, training arrays,
validation batch); :func:`retrain` trains one model on a subset mask with the recipe of
``dealrec train-surrogate`` for a fixed number of epochs (:func:`retrain_scan`: the same
models, each epoch one jitted ``lax.scan``); :func:`valid_losses` measures each
validation user's loss. Many retrains at once: one jitted, ``jax.vmap``-ed training step over a
stack of models, each with its own subset mask and training seed.


:func:`retrain_many` reproduces :func:`retrain` for every ``(mask, seed)`` pair: the
same initialisation (``cfg.seed``), the same per-model batch order (``numpy`` generator
``[cfg.seed, seed]``), negatives (``training_data(..., epoch, seed)``) and dropout keys
(``PRNGKey(seed + 1)``, split once per step the model takes). Every model walks its own
sequence of batches; one vmapped call advances the models whose next batch has one width (the
width most models are waiting on), the others sit that call out (parameters, Adam state and
key unchanged, by ``jnp.where``). A batch is never cut to another width than the
one-at-a-time retrain's: dropout draws bits for the whole ``[B, width, hidden]`` array, so a
wider cut would change them. Results equal the one-at-a-time retrains up to float rounding
(tested); the idle slots of a call are the price (``seconds`` / ``calls`` measure it).
"""

from __future__ import annotations

import collections
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec import models
from jaxrec.base import Loss, Params, PerSampleLoss
from jaxrec.config import SurrogateConfig
from jaxrec.data import Dataset, training_arrays
from jaxrec.data.buckets import TRAIN_WIDTHS, bucket_widths
from jaxrec.errors import UserError
from jaxrec.models.sasrec import positions_per_sample
from jaxrec.train import (
    build_model,
    epoch_batches,
    loss_fns,
    make_train_step,
    take_batch,
    target_lengths,
    train_epoch,
    train_step_fn,
    training_data,
    with_negatives,
)


@dataclass
class SurrogateTask:
    """What retraining a surrogate on subsets needs: model, its pure loss pair, the training
    arrays (one row per user), the fixed-negative data the influence engine differentiates,
    and the validation batch (one row per validation user)."""

    cfg: SurrogateConfig
    model: Any
    init_params: Callable
    loss: Loss
    per_sample_loss: PerSampleLoss
    sample_loss: PerSampleLoss  # the per-user loss (jaxrec.models.sample_loss): DEALRec's g_i
    arrays: dict
    train_data: dict
    valid: dict
    step: Callable
    dataset: Any  # the Dataset (sequence negatives exclude each user's train items)
    # retrain_many's jitted, vmapped step, built once per task (a new one recompiles)
    many_step: Callable | None = field(default=None, repr=False)
    # retrain_scan's jitted epoch (a lax.scan over the epoch's batches), built once per task
    epoch_scan: Callable | None = field(default=None, repr=False)


def model_module(cfg: SurrogateConfig) -> tuple[ModuleType, models.ModelSpec]:
    """The model's registry entry (:func:`jaxrec.models.spec`): ``init_params`` and, where the
    model defines one, ``validation_arrays(ds, max_len)`` for its own batch format."""
    name = getattr(cfg, "model", "sasrec")
    return importlib.import_module(f"jaxrec.models.{name}"), models.spec(name)


def validation_arrays(ds: Dataset, max_len: int) -> dict:
    """Next-item samples whose targets are each user's valid items (after the train history;
    train targets are not scored), for the users with a valid item; ``index`` = user row.
    Negatives come from a fixed seed, so the validation loss is one fixed function."""
    rows = [u for u in range(ds.n_users) if len(ds.valid[u]) and len(ds.train[u])]
    inputs = np.zeros((len(rows), max_len), np.int32)
    targets = np.zeros_like(inputs)
    for r, u in enumerate(rows):
        seq = np.concatenate([ds.train[u], ds.valid[u]])[-(max_len + 1) :]
        n_valid = min(len(ds.valid[u]), len(seq) - 1)
        inputs[r, max_len - len(seq) + 1 :] = seq[:-1]
        targets[r, max_len - n_valid :] = seq[-n_valid:]
    arrays = {"inputs": inputs, "targets": targets, "index": np.asarray(rows, np.int32)}
    return with_negatives(arrays, 12345, 0, ds.n_items)


def surrogate_task(cfg: SurrogateConfig, ds: Dataset) -> SurrogateTask:
    """The :class:`SurrogateTask` of ``cfg``'s model on dataset ``ds`` (model from
    :func:`jaxrec.train.build_model`, training step from :func:`jaxrec.train.make_train_step`,
    loss pair and initialisation from the model's module). A model module may define
    ``validation_arrays(ds, max_len)`` for its own batch format; else :func:`validation_arrays`."""
    module, model_spec = model_module(cfg)
    model = build_model(cfg, ds.n_items, ds)
    arrays = training_arrays(ds, cfg.max_len)
    loss, per_sample_loss = loss_fns(cfg, model, arrays)
    valid = getattr(module, "validation_arrays", validation_arrays)(ds, cfg.max_len)
    if len(valid["inputs"]) == 0:
        raise UserError(f"{ds.path}: no user has a valid item; LDS needs validation users")
    return SurrogateTask(
        cfg=cfg,
        model=model,
        init_params=model_spec.init_params,
        loss=loss,
        per_sample_loss=per_sample_loss,
        sample_loss=models.sample_loss(model),
        arrays=arrays,
        train_data=training_data(cfg, arrays, ds, 0),
        valid=valid,
        step=make_train_step(
            model,
            optax.adam(cfg.lr),
            cfg.loss_weighting,
            float(positions_per_sample(arrays["targets"])),
        ),
        dataset=ds,
    )


def _start(task: SurrogateTask, mask: np.ndarray, seed: int) -> tuple:
    """The shared start of :func:`retrain` and :func:`retrain_scan`: the initial parameters
    and Adam state, the arrays with the targets of users outside ``mask`` cleared, and the
    training-noise streams of ``seed``."""
    cfg = task.cfg
    params = task.init_params(task.model, jax.random.PRNGKey(cfg.seed))
    opt_state = optax.adam(cfg.lr).init(params)
    arrays = dict(task.arrays, targets=np.where(mask[:, None], task.arrays["targets"], 0))
    return (
        params,
        opt_state,
        arrays,
        np.random.default_rng([cfg.seed, seed]),
        jax.random.PRNGKey(seed + 1),
    )


def retrain(
    task: SurrogateTask,
    mask: np.ndarray,
    seed: int,
    *,
    on_epoch: Callable[[int, Params], None] | None = None,
) -> Params:
    """Train from the initialisation of ``task.cfg.seed`` on the users in ``mask`` for
    ``task.cfg.epochs`` epochs (no early stopping, so every retrain follows one recipe: the
    epoch loop of ``dealrec train-surrogate``). ``seed`` drives the training noise only:
    batch order, dropout and sampled negatives. Users outside ``mask`` have their targets
    cleared, so they are never in a batch. ``on_epoch(epoch, params)`` sees the parameters
    after each epoch (TracIn-CP's checkpoints). Returns the parameters."""
    cfg = task.cfg
    params, opt_state, arrays, rng, key = _start(task, mask, seed)
    for epoch in range(1, cfg.epochs + 1):
        data = training_data(cfg, arrays, task.dataset, epoch, seed)
        params, opt_state, key, value = train_epoch(
            task.step, params, opt_state, key, data, cfg, rng
        )
        if not np.isfinite(value):
            raise UserError(f"retraining diverged at epoch {epoch} (loss {value}); lower lr=")
        if on_epoch is not None:
            on_epoch(epoch, params)
    return params


def _epoch_scan(raw: Callable, widths: tuple[int, ...]) -> Callable:
    """Jitted ``(params, opt_state, key, batches, weights, which) -> (params, opt_state, key,
    losses)``: one ``lax.scan`` over an epoch's batches, each stored at the widest width
    ``widths[-1]``; step ``t`` cuts its batch to ``widths[which[t]]`` columns (``lax.switch``,
    so it computes exactly the one-width step of :func:`retrain`, dropout bits included) and
    splits the key as :func:`retrain` does; ``which[t] = len(widths)`` is a padding step that
    changes nothing (so epochs of different lengths share one compiled scan)."""

    def branch(width: int) -> Callable:
        def go(state, batch, weights):
            params, opt_state, key = state
            key, sub = jax.random.split(key)
            cut = {k: v[:, -width:] for k, v in batch.items()}
            params, opt_state, value = raw(params, opt_state, cut, weights, sub)
            return (params, opt_state, key), value

        return go

    def skip(state, batch, weights):
        return state, jnp.float32(jnp.nan)

    branches = [branch(w) for w in widths] + [skip]

    @partial(jax.jit, donate_argnums=(0, 1))
    def epoch(params, opt_state, key, batches, weights, which):
        def body(state, xs):
            batch, w, i = xs
            return jax.lax.switch(i, branches, state, batch, w)

        (params, opt_state, key), values = jax.lax.scan(
            body, (params, opt_state, key), (batches, weights, which)
        )
        return params, opt_state, key, values

    return epoch


def retrain_scan(
    task: SurrogateTask,
    mask: np.ndarray,
    seed: int,
    *,
    pad_to: int = 8,
) -> Params:
    """:func:`retrain` with each epoch run as one jitted ``lax.scan`` over its batches (one
    dispatch per epoch instead of one per step; issue 27 section 3, idea (a)).

    The batches, their order, widths, negatives and dropout keys are those of :func:`retrain`
    (the same calls of the same generators, in the same order): each batch is gathered at the
    widest training width and cut back to its own width inside the scan. Results equal
    :func:`retrain` up to float rounding (tested).

    Args:
      task: a :class:`SurrogateTask`.
      mask: ``[n]`` bool, the users the model trains on.
      seed: the training seed (batch order, dropout, sampled negatives).
      pad_to: each epoch's scan is padded with no-op steps to a multiple of this many steps,
        so epochs and subsets with a few batches more or less reuse one compiled scan.
    Returns:
      the parameters.
    """
    cfg = task.cfg
    widths = tuple(bucket_widths(cfg.max_len, TRAIN_WIDTHS))
    if task.epoch_scan is None:
        raw = train_step_fn(
            task.model,
            optax.adam(cfg.lr),
            cfg.loss_weighting,
            float(positions_per_sample(task.arrays["targets"])),
        )
        task.epoch_scan = _epoch_scan(raw, widths)
    params, opt_state, arrays, rng, key = _start(task, mask, seed)
    for epoch in range(1, cfg.epochs + 1):
        data = training_data(cfg, arrays, task.dataset, epoch, seed)
        plan = epoch_batches(target_lengths(data), cfg.batch_size, cfg.max_len, rng, cfg.batching)
        steps = -(-len(plan) // pad_to) * pad_to
        pad = -np.ones(cfg.batch_size, int)
        rows = [r for r, _ in plan] + [pad] * (steps - len(plan))
        which = np.full(steps, len(widths), np.int32)
        which[: len(plan)] = [widths.index(w) for _, w in plan]
        parts = [take_batch(data, r, widths[-1]) for r in rows]
        batches = {k: np.stack([b[k] for b in parts]) for k in parts[0]}
        weights = np.stack([(r >= 0).astype(np.float32) for r in rows])
        params, opt_state, key, values = task.epoch_scan(
            params, opt_state, key, batches, weights, which
        )
        value = float(np.mean(np.asarray(values)[: len(plan)]))
        if not np.isfinite(value):
            raise UserError(f"retraining diverged at epoch {epoch} (loss {value}); lower lr=")
    return params


def valid_losses(task: SurrogateTask, params: Params) -> np.ndarray:
    """Each validation user's loss ``[n_valid]`` under ``params`` (the model's
    ``per_sample_loss`` on :attr:`SurrogateTask.valid`)."""
    batch = {k: jnp.asarray(v) for k, v in task.valid.items() if k != "index"}
    return np.asarray(jax.jit(task.per_sample_loss)(params, batch), np.float64)


def _many_step(raw):
    """Jitted ``(params, opt_state, batch, weights, rngs, active) -> (params, opt_state,
    losses)`` over a leading model axis; models with ``active`` False keep their state."""

    @partial(jax.jit, donate_argnums=(0, 1))
    def many(params, opt_state, batch, weights, rngs, active):
        new_p, new_o, value = jax.vmap(raw)(params, opt_state, batch, weights, rngs)

        def keep(new, old):
            return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        return jax.tree.map(keep, new_p, params), jax.tree.map(keep, new_o, opt_state), value

    return many


@jax.jit
def _split_active(keys, active):
    """Per model ``key, sub = split(key)`` where active; inactive keys stay."""
    new = jax.vmap(jax.random.split)(keys)  # [M, 2, 2]
    return jnp.where(active[:, None], new[:, 0], keys), new[:, 1]


def retrain_many(
    task: SurrogateTask, masks: np.ndarray, seeds: Sequence[int], *, group: int | None = None
) -> Params:
    """Train one model per ``(masks[m], seeds[m])`` as :func:`retrain` does, all at
    once (``group`` models per vmapped step; default all).

    Args:
      task: a :class:`SurrogateTask`.
      masks: ``[M, n]`` bool, the users each model trains on.
      seeds: ``M`` training seeds (batch order, dropout, sampled negatives).
      group: at most this many models per stacked step (memory: each model holds its
        parameters and Adam state).
    Returns:
      the parameters stacked along a leading model axis ``M``.
    """
    masks = np.asarray(masks, bool)
    seeds = [int(s) for s in seeds]
    if masks.ndim != 2 or len(masks) != len(seeds) or not len(seeds):
        raise UserError(f"masks must be [M, n] with M = len(seeds); got {masks.shape}, {seeds}")
    group = group or len(seeds)
    parts = [
        _retrain_group(task, masks[i : i + group], seeds[i : i + group])
        for i in range(0, len(seeds), group)
    ]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def _retrain_group(task: SurrogateTask, masks: np.ndarray, seeds: list[int]) -> Params:
    """:func:`retrain_many` on one group of models. Long because of one loop
    whose per-model state (epoch, position in the epoch's plan, that epoch's data, RNG) every
    step reads and advances together; split, the pieces would pass all of it around."""
    cfg = task.cfg
    m = len(seeds)
    optimizer = optax.adam(cfg.lr)
    if task.many_step is None:
        raw = train_step_fn(
            task.model,
            optimizer,
            cfg.loss_weighting,
            float(positions_per_sample(task.arrays["targets"])),
        )
        task.many_step = _many_step(raw)
    step = task.many_step
    init = task.init_params(task.model, jax.random.PRNGKey(cfg.seed))
    params = jax.tree.map(lambda x: jnp.stack([x] * m), init)
    opt_state = jax.vmap(optimizer.init)(params)
    arrays = [
        dict(task.arrays, targets=np.where(mask[:, None], task.arrays["targets"], 0))
        for mask in masks
    ]
    rngs = [np.random.default_rng([cfg.seed, s]) for s in seeds]
    keys = jnp.stack([jax.random.PRNGKey(s + 1) for s in seeds])
    epoch, pos = [1] * m, [0] * m
    data: list[Any] = [None] * m
    plans: list[Any] = [None] * m

    def start_epoch(i):
        data[i] = training_data(cfg, arrays[i], task.dataset, epoch[i], seeds[i])
        plans[i] = epoch_batches(
            target_lengths(data[i]), cfg.batch_size, cfg.max_len, rngs[i], cfg.batching
        )
        pos[i] = 0

    for i in range(m):
        start_epoch(i)
    values: list = []  # per call
    taken: list[list[tuple[int, int]]] = [[] for _ in range(m)]  # per model (call, epoch)
    while True:
        live = [i for i in range(m) if epoch[i] <= cfg.epochs and pos[i] < len(plans[i])]
        if not live:
            break
        widths = collections.Counter(plans[i][pos[i]][1] for i in live)
        width = max(widths, key=lambda w: (widths[w], -w))  # most models ready; then narrower
        active = np.zeros(m, bool)
        active[[i for i in live if plans[i][pos[i]][1] == width]] = True
        pad = -np.ones(cfg.batch_size, int)
        rows = [plans[i][pos[i]][0] if active[i] else pad for i in range(m)]
        parts = [
            take_batch(data[i] if active[i] else data[live[0]], r, width)
            for i, r in enumerate(rows)
        ]
        batch = {k: np.stack([b[k] for b in parts]) for k in parts[0]}
        weights = np.stack([(r >= 0).astype(np.float32) for r in rows])
        keys, subs = _split_active(keys, jnp.asarray(active))
        params, opt_state, value = step(
            params, opt_state, batch, weights, subs, jnp.asarray(active)
        )
        values.append(value)
        for i in map(int, np.flatnonzero(active)):
            taken[i].append((len(values) - 1, epoch[i]))
            pos[i] += 1
            if pos[i] == len(plans[i]):
                epoch[i] += 1
                if epoch[i] <= cfg.epochs:
                    start_epoch(i)
    losses = np.asarray(jax.device_get(values))
    for i in range(m):
        for e in range(1, cfg.epochs + 1):
            v = float(np.mean([losses[c, i] for c, ep in taken[i] if ep == e]))
            if not np.isfinite(v):
                raise UserError(
                    f"retraining diverged at epoch {e} (seed {seeds[i]}, loss {v}); lower lr="
                )
    return params


def valid_losses_many(task: SurrogateTask, stacked: Params) -> np.ndarray:
    """``[M, n_valid]``: each stacked model's validation losses (as
    :func:`valid_losses`, vmapped over the model axis)."""
    batch = {k: jnp.asarray(v) for k, v in task.valid.items() if k != "index"}
    fn = jax.jit(jax.vmap(task.per_sample_loss, in_axes=(0, None)))
    return np.asarray(fn(stacked, batch), np.float64)
