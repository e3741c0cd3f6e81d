"""TRAK (Park et al. 2023, "TRAK: attributing model behavior at scale", Eq. 13-17): random
projections of per-sample gradients and the inverse of the projected Gauss-Newton matrix,
averaged over an ensemble of models.

Per model ``m``: a Gaussian projection ``P`` (``d x k``, entries ``N(0, 1/k)``, a
Johnson-Lindenstrauss map); the projected Gauss-Newton matrix ``F = (1/n) sum_i sum_k
phi_ik phi_ik^T`` with ``phi_ik = P^T grad o_ik`` over the fitted data (``o = output(params,
batch) -> [B, K]``, whitened outputs; without ``output`` the per-sample losses, i.e. the
empirical Fisher); then ``a[i, j] = (P^T g_i) . (F + damping I)^-1 (P^T g_j)`` with ``g`` loss
gradients. Scores are averaged over the models of :class:`~jaxrec.influence.attribution.
Checkpoints` (each with its own projection seed).

Departures from Park et al.: (1) the training side is ``P^T g_i`` (the loss gradient, which for
a loss of one scalar output ``o_i`` is their ``phi_i`` times the out-to-loss weight ``q_i``)
and the query side is the query's loss gradient rather than the model-output gradient (the LDS
here measures losses; for one scalar output this rescales each query's column only); (2) ``F``
is the mean, not the sum, over samples (so ``damping`` matches the other estimators' scale);
(3) ensembling averages the scores, where TRAK averages the features' products and the
out-to-loss weights separately. With ``dim`` = the parameter count, ``P`` is square and
invertible and, at ``damping=0``, ``a = g_i . GN^-1 g_j`` exactly (tested).
Per-sample gradients exist one batch at a time (``vmap`` of ``jacrev``); ``P`` is drawn inside
the jitted step from its key, one leaf at a time, so it is never stored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.influence_options import TRAKOptions
from jaxrec.errors import UserError
from jaxrec.base import Params
from jaxrec.influence.batching import Data, total_size
from jaxrec.influence.pairwise import Checkpoints, State, batch_reduce, query_gradients
from jaxrec.influence.scores import per_sample_map


ESTIMATORS = {TRAKOptions: "trak"}


def projected(tree: Params, params: Params, key: jax.Array, dim: int) -> jax.Array | None:
    """``P^T x`` for a pytree ``tree`` shaped like ``params`` plus leading axes: each leaf is
    flattened over ``params``' leaf shape and multiplied by its Gaussian block, drawn from
    ``fold_in(key, leaf index)`` (``N(0, 1/dim)`` entries). Returns ``[*lead, dim]``."""
    out = None
    for i, (x, p) in enumerate(zip(jax.tree.leaves(tree), jax.tree.leaves(params))):
        lead = x.shape[: x.ndim - p.ndim]
        flat = x.reshape(*lead, p.size)
        blk = jax.random.normal(jax.random.fold_in(key, i), (p.size, dim), flat.dtype)
        y = flat @ blk / jnp.sqrt(jnp.asarray(dim, flat.dtype))
        out = y if out is None else out + y
    return out


@functools.lru_cache(maxsize=8)
def _features_fn(fn, dim: int):
    """``(params, batch, key) -> [B, K, dim]``: each row's Jacobian of ``fn(params, row)``
    (flattened to K outputs), projected."""

    def one(p, example):
        return jnp.reshape(fn(p, jax.tree.map(lambda x: x[None], example))[0], (-1,))

    def features(p, batch, key):
        jac = jax.vmap(jax.jacrev(one), in_axes=(None, 0))(p, batch)  # leaves [B, K, ...]
        return projected(jac, p, key, dim)

    return features


def _models(state) -> list:

    return list(state.params.params) if isinstance(state.params, Checkpoints) else [state.params]


def fit_state(state: State, progress: bool | None = None) -> dict:
    """Per model: ``(F + damping I)^-1`` (float64, ``dim x dim``) of the projected
    Gauss-Newton matrix ``F`` over the fitted data."""

    opts = state.options
    if opts.dim < 1 or opts.damping < 0:
        raise UserError(f"TRAK needs dim >= 1 and damping >= 0 (dim={opts.dim})")
    out_fn = state.output or state.per_sample_loss
    feats = _features_fn(out_fn, opts.dim)
    n = total_size(state.data)

    def fn(p, batch, weight, acc, key):
        phi = feats(p, batch, key) * weight[:, None, None]
        return acc + jnp.einsum("bkd,bke->de", phi, phi)

    inverses = []
    for m, params in enumerate(_models(state)):
        key = jax.random.fold_in(jax.random.PRNGKey(opts.seed), m)
        dtype = jax.tree.leaves(params)[0].dtype
        f = batch_reduce(
            fn,
            params,
            state.data,
            jnp.zeros((opts.dim, opts.dim), dtype),
            opts.batch_size,
            extra=(key,),
            desc="trak",
            progress=progress,
        )
        f = np.asarray(f, np.float64) / n + opts.damping * np.eye(opts.dim)
        try:
            inverses.append(np.linalg.inv(f))
        except np.linalg.LinAlgError:
            raise UserError(
                f"TRAK's projected Gauss-Newton matrix is singular (dim={opts.dim}); "
                "give damping= or lower dim="
            ) from None
    return {"inverses": inverses}


def attribute(
    state: State, train: Data, query: Data, query_mean: bool, progress: bool | None = None
) -> np.ndarray:
    """Eq. 16-17 per model (projected training and query gradients through the fitted
    inverse), averaged over the models."""

    opts = state.options
    total = None
    for m, (params, inv) in enumerate(zip(_models(state), state.fitted["inverses"])):
        key = jax.random.fold_in(jax.random.PRNGKey(opts.seed), m)
        x = per_sample_map(
            _train_fn(state.per_sample_loss, opts.dim),
            params,
            train,
            opts.batch_size,
            extra=(key,),
            desc="trak features",
            progress=progress,
        )
        g = query_gradients(state, query, query_mean=query_mean, params=params)
        y = np.asarray(jax.jit(projected, static_argnums=3)(g, params, key, opts.dim))
        a = np.asarray(x, np.float64) @ inv @ np.asarray(y, np.float64).T
        total = a if total is None else total + a
    assert total is not None  # fit_state checked there is at least one model
    return total / len(state.fitted["inverses"])


@functools.lru_cache(maxsize=8)
def _train_fn(per_sample_loss, dim: int):
    feats = _features_fn(per_sample_loss, dim)

    def fn(p, batch, key):
        return feats(p, batch, key)[:, 0, :]

    return fn
