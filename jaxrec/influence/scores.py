"""Per-sample scores over a whole data set: DEALRec influence (paper Eq. 9-11), GraNd, EL2N.

The influence score needs ``g_i . u`` for every sample ``i``, with ``g_i`` the gradient of
sample ``i``'s loss and ``u = H^-1 g_mean``. It is the JVP of the per-sample loss vector along
``u``: one forward-mode pass per batch scores the whole batch, no per-sample gradient is ever
built, and memory stays O(params + batch).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.base import Loss, Params, PerSampleLoss
from jaxrec.config import InfluenceConfig
from jaxrec.errors import UserError
import jaxrec.influence.hosts as hosts
from jaxrec.influence.batching import (
    Data,
    data_mesh,
    global_size,
    in_order,
    replicate,
    strata_batches,
)
from jaxrec.influence.inverse import SolverOptions, inverse_hvp_with_info


def _check_finite(array, what: str):
    bad = ~np.isfinite(array)
    if bad.any():
        raise UserError(
            f"{what} is not finite for {int(bad.sum())} of {array.size} values "
            f"(first at index {int(np.argmax(bad))}); check the model and data"
        )


# Bounded: a key is a function, and a jitted closure keeps alive everything its function closes
# over (e.g. a parameter tree, via ``ParamSubset.restrict``). Calls with the same function
# (``ParamSubset.restrict`` returns the same closure for the same loss) hit; a loop over fresh
# closures evicts the oldest instead of keeping every parameter tree.
_CACHE_SIZE = 8


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _jit(fn):
    """``jax.jit(fn)``, one per ``fn``, so repeated calls reuse its compilations."""
    return jax.jit(fn)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _grad_sum_fn(per_sample_loss):
    """Jitted ``(params, batch, weight, acc) -> acc + grad sum_i weight_i loss_i``.

    ``acc`` is donated, so XLA adds a batch's gradient into it in place instead of writing a
    fresh parameter-sized buffer per batch: 2.1x faster per batch at 16x Games' items, the
    same at 1x (``bench/donation.py``)."""

    @functools.partial(jax.jit, donate_argnums=3)
    def grad_sum(p, batch, weight, acc):
        g = jax.grad(
            lambda q: jnp.sum(
                weight.astype(jnp.result_type(*jax.tree.leaves(q))) * per_sample_loss(q, batch)
            )
        )(p)
        return jax.tree.map(jnp.add, acc, g)

    return grad_sum


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _jvp_fn(per_sample_loss):
    """``(params, batch, u) -> g . u`` per sample (one JVP), one function per loss."""

    def jvp(p, batch, u):
        return jax.jvp(lambda q: per_sample_loss(q, batch), (p,), (u,))[1]

    return jvp


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _grand_fn(per_sample_loss):
    """``(params, batch) -> ||grad loss_i||`` per sample, one function per loss (so repeated
    GraNd passes over models of one architecture compile once)."""

    def one(p, example):
        batch = jax.tree.map(lambda x: x[None], example)
        return per_sample_loss(p, batch)[0]

    def norms(p, batch):
        g = jax.vmap(jax.grad(one), in_axes=(None, 0))(p, batch)
        return jnp.sqrt(
            sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, -1) for x in jax.tree.leaves(g))
        )

    return norms


def per_sample_map(
    fn: Callable[..., jax.Array],
    params: Params,
    data: Data,
    batch_size: int = 1024,
    *,
    extra: tuple = (),
    desc: str = "batches",
    progress: bool | None = None,
) -> np.ndarray:
    """``fn(params, batch, *extra) -> [B]`` over all of ``data``, batched, padded, sharded.

    Returns a NumPy array ``[n]`` (padding rows dropped), in the order of ``data`` (strata
    concatenated; a :class:`~jaxrec.influence.batching.Strata`'s own order). Compiles once per
    stratum shape.
    """
    mesh = data_mesh()
    params, extra = replicate((params, extra), mesh)
    jfn = _jit(fn)
    out = [
        np.asarray(jfn(params, batch, *extra))[:count]
        for count, batch, _ in strata_batches(data, batch_size, mesh, desc=desc, progress=progress)
    ]
    return in_order(data, np.concatenate(out))


def sample_scores(
    per_sample_loss: PerSampleLoss,
    params: Params,
    data: Data,
    u: Params,
    batch_size: int = 4096,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """``s_i = g_i . u`` for every sample (the inner product of paper Eq. 10-11).

    One ``jax.jvp`` of ``per_sample_loss(params, batch) -> [B]`` along ``u`` per batch; batches
    are padded to one shape (one compilation) and sharded over all devices. Returns ``[n]``.
    """
    s = per_sample_map(
        _jvp_fn(per_sample_loss),
        params,
        data,
        batch_size,
        extra=(u,),
        desc="scores",
        progress=progress,
    )
    _check_finite(s, "sample score g_i . u")
    return s


def mean_gradient(
    per_sample_loss: PerSampleLoss,
    params: Params,
    data: Data,
    batch_size: int = 4096,
    *,
    progress: bool | None = None,
) -> Params:
    """``(1/n) sum_i grad loss_i``: the mean training gradient (paper Eq. 10's sum over
    samples), batched with padding masked by weights and sharded over all devices. Under JAX's
    multi-process runtime each process sums its own rows and one all-reduce adds the sums
    (:func:`jaxrec.influence.hosts.allreduce`); ``n`` counts every process's rows."""
    n = global_size(data)
    mesh = data_mesh()
    params = replicate(params, mesh)
    grad_sum = _grad_sum_fn(per_sample_loss)
    acc = jax.tree.map(jnp.zeros_like, params)
    for _, batch, weight in strata_batches(
        data, batch_size, mesh, desc="mean gradient", progress=progress
    ):
        acc = grad_sum(params, batch, weight, acc)
    if hosts.multi():
        acc = hosts.allreduce(acc)
    g = jax.tree.map(lambda x: x / n, acc)
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g)):
        raise UserError("mean gradient is not finite; check the model and data")
    return g


def influence_scores(
    loss: Loss,
    per_sample_loss: PerSampleLoss,
    params: Params,
    data: Data,
    *,
    solver: str | SolverOptions = InfluenceConfig.solver,
    damping: float = InfluenceConfig.damping,
    convention: str = InfluenceConfig.convention,
    scale: float = InfluenceConfig.scale,
    batch_size: int = InfluenceConfig.batch_size,
    sample_loss: PerSampleLoss | None = None,
    progress: bool | None = None,
    **solver_options: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """DEALRec influence of removing each sample on the empirical risk (paper Eq. 11):
    ``score_i = g_i . H^-1 g_mean / n^2``.

    ``v = mean_gradient(per_sample_loss)``, ``u = inverse_hvp(loss, ..., v)``,
    ``s = sample_scores(sample_loss, ..., u)``; ``solver``, ``damping``, ``convention``,
    ``scale`` and ``solver_options`` go to :func:`~jaxrec.influence.inverse_hvp`,
    ``batch_size`` to the gradient and score passes. ``sample_loss(params, batch) -> [B]``
    is the loss whose gradient ``g_i`` scores sample ``i`` (default ``per_sample_loss``, the
    training loss's per-sample terms); the paper's code scores a user with that user's own
    loss on a batch of one (:func:`jaxrec.models.sample_loss`), while ``g_mean`` and the
    Hessian are those of the training loss.

    The defaults are ``dealrec influence``'s, read from the same :class:`InfluenceConfig`
    fields: LiSSA, ``convention="dealrec"`` (what the paper's LiSSA recursion converges to,
    ``scale (H + scale*damping I)^-1 v``), ``damping=0.01``, ``scale=25``. (The primitive
    :func:`~jaxrec.influence.inverse_hvp` keeps ``convention="standard"``, ``(H + damping
    I)^-1 v``, with ``damping=0``.)
    Under JAX's multi-process runtime ``data`` is this process's rows: the mean gradient and
    the solver's HVPs cover every process's (``n`` too), the scores are this process's rows.
    Returns ``(scores [n], info)`` where ``info`` holds the solver's report and timings.

    Long because of its documentation; the code is the three timed steps.
    """
    n = global_size(data)
    t0 = time.perf_counter()
    v = mean_gradient(per_sample_loss, params, data, batch_size, progress=progress)
    jax.block_until_ready(v)
    t1 = time.perf_counter()
    u, info = inverse_hvp_with_info(
        loss,
        params,
        data,
        v,
        solver=solver,
        damping=damping,
        convention=convention,
        scale=scale,
        progress=progress,
        **solver_options,
    )
    jax.block_until_ready(u)
    t2 = time.perf_counter()
    score_loss = per_sample_loss if sample_loss is None else sample_loss
    s = sample_scores(score_loss, params, data, u, batch_size, progress=progress) / n**2
    t3 = time.perf_counter()
    info = dict(
        info,
        seconds={"mean_gradient": t1 - t0, "solve": t2 - t1, "scores": t3 - t2, "total": t3 - t0},
    )
    return s, info


def grand_scores(
    per_sample_loss: PerSampleLoss,
    params: Params,
    data: Data,
    batch_size: int = 64,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """GraNd (Paul et al. 2021): ``||grad loss_i||_2`` per sample, by ``vmap`` of ``grad`` over
    a batch (memory O(batch x params): keep ``batch_size`` small for big models).

    Paul et al. score a model early in training, averaged over initialisations; this function
    scores whatever ``params`` it is given (``dealrec influence --score grand`` passes the
    trained surrogate's by default, or each early-training model's with
    ``--score-model early``)."""
    s = per_sample_map(
        _grand_fn(per_sample_loss), params, data, batch_size, desc="grand", progress=progress
    )
    _check_finite(s, "GraNd gradient norm")
    return s


def el2n_scores(
    error_fn: PerSampleLoss,
    params: Params,
    data: Data,
    batch_size: int = 4096,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """EL2N (Paul et al. 2021): the L2 norm of each sample's prediction error,
    ``error_fn(params, batch) -> [B]`` (model-specific; SASRec's is
    :func:`jaxrec.models.sasrec.el2n_error`), for the model ``params`` (Paul et al. use a model
    a few epochs into training, averaged over initialisations; ``dealrec influence`` passes
    the trained surrogate by default, see ``--score-model``)."""
    s = per_sample_map(error_fn, params, data, batch_size, desc="el2n", progress=progress)
    _check_finite(s, "EL2N error")
    return s
