"""The machinery every estimator of :mod:`jaxrec.influence.attribution` shares: the fitted
:class:`State`, :class:`Checkpoints`, per-sample query gradients, the pairwise JVP scores
``g_i . u_j``, the fitting reduction over batches, and the cost reports (seconds, peak memory).

The estimator modules (``kfac``, ``trak``, ``tracin``, ``datainf``) import from here and
:mod:`jaxrec.influence.attribution` imports them: no cycle.
"""

from __future__ import annotations

import functools
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.base import Params, PerSampleLoss
from jaxrec.errors import UserError
from jaxrec.influence.batching import Data, data_mesh, in_order, replicate, strata_batches
from jaxrec.influence.scores import mean_gradient, per_sample_map

_CACHE_SIZE = 8


@dataclass(frozen=True)
class Checkpoints:
    """Several parameter pytrees of one model (same structure): TracIn-CP's saved checkpoints
    with the learning rate in force at each (``learning_rates``), or TRAK's ensemble of
    independently trained models (``learning_rates`` unused)."""

    params: tuple[Params, ...]
    learning_rates: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(self.params))
        if not self.params:
            raise UserError("Checkpoints(params=...) is empty")
        if self.learning_rates is not None:
            lrs = tuple(float(x) for x in self.learning_rates)
            if len(lrs) != len(self.params):
                raise UserError(
                    f"Checkpoints: {len(self.params)} params but {len(lrs)} learning_rates"
                )
            object.__setattr__(self, "learning_rates", lrs)


@dataclass
class State:
    """What :func:`fit` returns and :func:`attribute` consumes: the options, the pure functions,
    the parameters, the fitted part (``fitted``: an estimator's factors, inverse, projection
    matrices; empty where nothing is query-independent), ``info`` (seconds and peak memory
    of the fit) and ``query_loss`` (the queries' per-sample loss where it is not
    ``per_sample_loss``)."""

    options: Any
    loss: Callable
    per_sample_loss: PerSampleLoss
    params: Any
    data: Any
    output: Callable | None = None
    fitted: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    query_loss: PerSampleLoss | None = None


# ----------------------------------------------------------------------------- cost reports
def _current_rss() -> int | None:
    """The process's resident set size now, in bytes (``/proc/self/statm``; ``None`` where
    there is no procfs, e.g. macOS)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def peak_memory() -> dict:
    """Peak memory so far: ``device_peak_bytes`` (sum over devices of
    ``peak_bytes_in_use`` where the backend reports it, e.g. GPUs; else ``None``) and
    ``host_peak_rss_bytes`` (the process's maximum resident set size). Both are high-water marks
    since the process started (neither backend can reset them), so an estimator's number bounds
    its own peak from above; :func:`measured` samples the block's own host peak instead."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"device_peak_bytes": sum(peaks) if peaks else None, "host_peak_rss_bytes": int(rss)}


class _RssSampler(threading.Thread):
    """Reads the process's RSS every ``interval`` seconds until :meth:`stop`; ``peak`` is the
    largest value seen (a sampled peak: an allocation freed within one interval can be missed)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, _current_rss(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            now = _current_rss()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def stop(self) -> int | None:
        self._done.set()
        self.join()
        now = _current_rss()
        return max(self.peak, now) if self.peak is not None and now is not None else self.peak


@contextmanager
def measured(info: dict, stage: str) -> Iterator[None]:
    """Record the wall-clock seconds of the block in ``info["seconds"][stage]`` and its memory
    in ``info["memory"][stage]``: the process's RSS at the block's start
    (``host_start_rss_bytes``) and the largest RSS sampled during the block (every 5 ms:
    ``host_block_peak_rss_bytes``; ``None`` without procfs), beside :func:`peak_memory`'s
    process-wide high-water marks. The block's peak minus its start is what the block itself
    added, whatever ran before it in the process."""
    sampler = _RssSampler()
    start = sampler.peak
    t0 = time.perf_counter()
    sampler.start()
    try:
        yield
    finally:
        peak = sampler.stop()
    info.setdefault("seconds", {})[stage] = time.perf_counter() - t0
    info.setdefault("memory", {})[stage] = {
        **peak_memory(),
        "host_start_rss_bytes": start,
        "host_block_peak_rss_bytes": peak,
    }


# ----------------------------------------------------------------------------- gradients
def _take(tree, j):
    return jax.tree.map(lambda x: x[j], tree)


def unstack(tree: Params) -> list:
    """A stacked pytree (leading axis q on every leaf) -> a list of q pytrees."""
    q = jax.tree.leaves(tree)[0].shape[0]
    return [_take(tree, j) for j in range(q)]


def stack(trees: list) -> Params:
    """A list of pytrees of one structure -> one stacked pytree (leading axis)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _per_sample_grad_fn(per_sample_loss):
    """Jitted ``(params, batch) -> stacked per-sample gradients [B, ...]`` (``vmap`` of
    ``grad`` over rows; memory O(batch x params))."""

    def one(p, example):
        return per_sample_loss(p, jax.tree.map(lambda x: x[None], example))[0]

    return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))


def per_sample_gradients(
    per_sample_loss: PerSampleLoss,
    params: Params,
    data: Data,
    batch_size: int = 64,
    *,
    progress: bool | None = None,
) -> Params:
    """Each row's loss gradient, stacked: a pytree like ``params`` with a leading axis ``n``
    (rows in the order of ``data``, strata concatenated). For the few query rows only: the
    result holds ``n`` gradients. Batched, padded and sharded over all devices.

    Returns:
      the stacked gradients ``g_j`` (each the gradient of ``per_sample_loss(params, row_j)``).
    """
    mesh = data_mesh()
    params = replicate(params, mesh)
    fn = _per_sample_grad_fn(per_sample_loss)
    parts = [
        jax.tree.map(lambda x, c=count: np.asarray(x)[:c], fn(params, batch))
        for count, batch, _ in strata_batches(
            data, batch_size, mesh, desc="query gradients", progress=progress
        )
    ]
    return in_order(data, jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *parts))


def query_gradients(
    state: State, query: Data, *, query_mean: bool = False, params: Params | None = None
) -> Params:
    """The query side of :func:`attribute`: stacked per-row gradients of ``query``, or with
    ``query_mean`` one vector, the mean gradient over ``query``
    (:func:`jaxrec.influence.mean_gradient`; the DEALRec score's ``g_mean``)."""
    params = state.params if params is None else params
    bs = getattr(state.options, "query_batch_size", 64)
    fn = state.query_loss or state.per_sample_loss
    if query_mean:
        g = mean_gradient(fn, params, query, getattr(state.options, "batch_size", 4096))
        return jax.tree.map(lambda x: x[None], g)
    return per_sample_gradients(fn, params, query, bs)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _pairwise_fn(per_sample_loss):
    """``(params, batch, vectors) -> [B, q]``: ``g_i . u_j`` for every row and every stacked
    vector, by one ``jax.linearize`` of the per-sample losses and a ``vmap`` of its JVP."""

    def fn(p, batch, vectors):
        _, jvp = jax.linearize(lambda q: per_sample_loss(q, batch), p)
        return jax.vmap(jvp)(vectors).T

    return fn


def pairwise_scores(
    per_sample_loss: PerSampleLoss,
    params: Params,
    train: Data,
    vectors: Params,
    batch_size: int = 4096,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """``a[i, j] = g_i . u_j`` for every training row ``i`` and stacked vector ``u_j``
    (``vectors``: a pytree like ``params`` with a leading axis q), float64 ``[n, q]``.

    One linearisation of ``per_sample_loss(params, batch) -> [B]`` per batch and ``q`` JVPs of
    it: no per-sample gradient is built (memory O(params x q + batch)). Batches are padded to
    one shape and sharded over all devices (:func:`jaxrec.influence.per_sample_map`)."""
    a = per_sample_map(
        _pairwise_fn(per_sample_loss),
        params,
        train,
        batch_size,
        extra=(vectors,),
        desc="pairwise scores",
        progress=progress,
    )
    a = np.asarray(a, np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        raise UserError(
            f"attribution scores are not finite for {int(bad.sum())} of {a.size} values; "
            "check the model, data and damping="
        )
    return a


def batch_reduce(
    fn: Callable[..., Any],
    params: Params,
    data: Data,
    init: Any,
    batch_size: int,
    *,
    extra: tuple = (),
    desc: str = "fit",
    progress: bool | None = None,
) -> Any:
    """``acc = fn(params, batch, weight, acc, *extra)`` over every padded, sharded batch of
    ``data`` (``weight`` 1 for real rows, 0 for padding), jitted once per batch shape.
    Returns the final ``acc``: the fitting passes (covariances, Gram matrices, norms)."""
    mesh = data_mesh()
    params, extra, acc = replicate((params, extra, init), mesh)
    jfn = jax.jit(fn)
    for _, batch, weight in strata_batches(data, batch_size, mesh, desc=desc, progress=progress):
        acc = jfn(params, batch, weight, acc, *extra)
    return acc


def effective_damping(damping: float, convention: str, scale: float) -> tuple[float, float]:
    """``(lam, factor)`` with ``u = factor (H + lam I)^-1 v``: the conventions of
    :func:`jaxrec.influence.inverse_hvp` (``dealrec``: ``scale (H + scale damping I)^-1``;
    ``standard``: ``(H + damping I)^-1``)."""
    if convention not in ("dealrec", "standard"):
        raise UserError(f"unknown convention {convention!r}; expected dealrec or standard")
    if damping < 0:
        raise UserError(f"damping must be >= 0, got damping={damping}")
    return (scale * damping, scale) if convention == "dealrec" else (damping, 1.0)
