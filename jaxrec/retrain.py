"""Many LDS retrains at once: one jitted, ``jax.vmap``-ed training step over a stack of models,
each with its own subset mask and training seed (issue 27, section 3).

:func:`retrain_many` reproduces :func:`jaxrec.lds.retrain` for every ``(mask, seed)`` pair: the
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
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import UserError


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


def retrain_many(task, masks: np.ndarray, seeds, *, group: int | None = None):
    """Train one model per ``(masks[m], seeds[m])`` as :func:`jaxrec.lds.retrain` does, all at
    once (``group`` models per vmapped step; default all).

    Args:
      task: a :class:`jaxrec.lds.SurrogateTask`.
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


def _retrain_group(task, masks, seeds):
    import optax

    from jaxrec.models.sasrec import positions_per_sample
    from jaxrec.train import epoch_batches, take_batch, target_lengths, train_step_fn
    from jaxrec.train import training_data

    cfg = task.cfg
    m = len(seeds)
    optimizer = optax.adam(cfg.lr)
    raw = train_step_fn(
        task.model,
        optimizer,
        cfg.loss_weighting,
        float(positions_per_sample(task.arrays["targets"])),
    )
    step = _many_step(raw)
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
    data, plans = [None] * m, [None] * m

    def start_epoch(i):
        data[i] = training_data(cfg, arrays[i], task.dataset, epoch[i], seeds[i])
        plans[i] = epoch_batches(
            target_lengths(data[i]), cfg.batch_size, cfg.max_len, rngs[i], cfg.batching
        )
        pos[i] = 0

    for i in range(m):
        start_epoch(i)
    values, taken = [], [[] for _ in range(m)]  # per call; per model (call, epoch)
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
        batch = [
            take_batch(data[i] if active[i] else data[live[0]], r, width)
            for i, r in enumerate(rows)
        ]
        batch = {k: np.stack([b[k] for b in batch]) for k in batch[0]}
        weights = np.stack([(r >= 0).astype(np.float32) for r in rows])
        keys, subs = _split_active(keys, jnp.asarray(active))
        params, opt_state, value = step(
            params, opt_state, batch, weights, subs, jnp.asarray(active)
        )
        values.append(value)
        for i in np.flatnonzero(active):
            taken[i].append((len(values) - 1, epoch[i]))
            pos[i] += 1
            if pos[i] == len(plans[i]):
                epoch[i] += 1
                if epoch[i] <= cfg.epochs:
                    start_epoch(i)
    values = np.asarray(jax.device_get(values))
    for i in range(m):
        for e in range(1, cfg.epochs + 1):
            v = float(np.mean([values[c, i] for c, ep in taken[i] if ep == e]))
            if not np.isfinite(v):
                raise UserError(
                    f"retraining diverged at epoch {e} (seed {seeds[i]}, loss {v}); lower lr="
                )
    return params


def valid_losses_many(task, stacked) -> np.ndarray:
    """``[M, n_valid]``: each stacked model's validation losses (as
    :func:`jaxrec.lds.valid_losses`, vmapped over the model axis)."""
    batch = {k: jnp.asarray(v) for k, v in task.valid.items() if k != "index"}
    fn = jax.jit(jax.vmap(task.per_sample_loss, in_axes=(0, None)))
    return np.asarray(fn(stacked, batch), np.float64)
