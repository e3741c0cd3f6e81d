"""One attribution API: ``state = fit(options, ...)`` once, then ``attribute(state, train, query)``.

The shape of dattri's ``cache`` / ``attribute`` and kronfluence's ``fit_all_factors`` then
``compute_pairwise_scores``: the expensive, query-independent part (a Hessian, its inverse or
eigenpairs, Kronecker factors, projected Gauss-Newton matrices) is fitted once; scores
``a[i, j]`` of every training sample ``i`` against every query ``j`` come after, as an
``[n_train, n_query]`` NumPy array::

    from jaxrec.influence import attribution as at
    state = at.fit(at.KFACOptions(), loss, per_sample_loss, params, data)
    a = at.attribute(state, train, query)       # [n_train, n_query]
    a, info = at.attribute(state, train, query, return_info=True)   # + seconds, peak memory

Every estimator takes the engine's pure functions, ``loss(params, batch) -> scalar`` (the mean)
and ``per_sample_loss(params, batch) -> [B]``, a parameter pytree (or :class:`Checkpoints` for
TracIn-CP and TRAK's ensemble) and data pytrees with a leading sample axis (or lists of strata).
The sign convention is the one of ``jaxrec.lds``: ``a[i, j] = g_i . M g_j`` with ``g`` loss
gradients and ``M`` the estimator's preconditioner (an inverse Hessian, Gauss-Newton or Fisher
approximation; the identity for grad-dot), so a large positive ``a[i, j]`` means that
up-weighting training sample ``i`` lowers query ``j``'s loss (Koh & Liang 2017, Eq. 2 without
its minus sign).

Estimators (their options dataclass selects them):

- :class:`InfluenceOptions`: the engine's solvers (exact / CG / LiSSA / Arnoldi,
  :func:`jaxrec.influence.inverse_hvp`), ``M = (H + lam I)^-1``.
- :class:`GradDotOptions`, :class:`GradCosOptions`: ``M = I``; cosine of the gradients.
- :class:`~jaxrec.influence.kfac.KFACOptions`, :class:`~jaxrec.influence.kfac.EKFACOptions`.
- :class:`~jaxrec.influence.trak.TRAKOptions`, :class:`~jaxrec.influence.tracin.TracInOptions`,
  :class:`~jaxrec.influence.datainf.DataInfOptions`.

Linear estimators (``M`` a matrix) precondition the few query gradients and then score every
training sample by one JVP of ``per_sample_loss`` per batch along the stacked preconditioned
vectors (:func:`pairwise_scores`): no training-sample gradient is built. Batches are padded,
sharded over all devices and jitted as in :func:`jaxrec.influence.per_sample_map`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxrec.config import CGOptions, option
from jaxrec.errors import UserError
from jaxrec.influence.batching import data_mesh, replicate, strata_batches, total_size
from jaxrec.influence.inverse import SolverOptions, solver_name, solver_options
from jaxrec.influence.scores import mean_gradient, per_sample_map

_CACHE_SIZE = 8


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class InfluenceOptions:
    """Influence functions with the engine's solvers (Koh & Liang 2017, Eq. 2):
    ``a[i, j] = g_i . factor (H + lam I)^-1 g_j``, ``H`` the Hessian of the mean loss over the
    fitted data; ``(lam, factor)`` from ``damping``, ``convention`` and ``scale`` as in
    :func:`jaxrec.influence.inverse_hvp`."""

    solver: SolverOptions = option(CGOptions(), "inverse-HVP solver and its options")
    damping: float = option(0.01, "damping added to the Hessian (see convention)")
    convention: str = option(
        "dealrec", "dealrec: scale (H + scale*damping I)^-1; standard: (H + damping I)^-1"
    )
    scale: float = option(25.0, "LiSSA's scale (the dealrec convention's factor)")
    batch_size: int = option(4096, "training samples per scoring batch")
    query_batch_size: int = option(64, "query samples per gradient batch")


@dataclass(frozen=True)
class GradDotOptions:
    """Gradient similarity (Charpiat et al. 2019): ``a[i, j] = g_i . g_j`` (``M = I``; TracIn
    at one checkpoint with unit learning rate)."""

    batch_size: int = option(4096, "training samples per scoring batch")
    query_batch_size: int = option(64, "query samples per gradient batch")


@dataclass(frozen=True)
class GradCosOptions:
    """Gradient cosine (Charpiat et al. 2019; dattri's Grad-Cos):
    ``a[i, j] = g_i . g_j / (|g_i| |g_j| + eps)``."""

    eps: float = option(1e-12, "added to the product of the norms")
    batch_size: int = option(4096, "training samples per scoring batch")
    norm_batch_size: int = option(64, "training samples per per-sample-gradient norm batch")
    query_batch_size: int = option(64, "query samples per gradient batch")


@dataclass(frozen=True)
class Checkpoints:
    """Several parameter pytrees of one model (same structure): TracIn-CP's saved checkpoints
    with the learning rate in force at each (``learning_rates``), or TRAK's ensemble of
    independently trained models (``learning_rates`` unused)."""

    params: tuple
    learning_rates: tuple | None = None

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
    matrices; empty where nothing is query-independent) and ``info`` (seconds and peak memory
    of the fit)."""

    options: Any
    loss: Callable
    per_sample_loss: Callable
    params: Any
    data: Any
    output: Callable | None = None
    fitted: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- cost reports
def peak_memory() -> dict:
    """Peak memory so far: ``device_peak_bytes`` (sum over devices of
    ``peak_bytes_in_use`` where the backend reports it, e.g. GPUs; else ``None``) and
    ``host_peak_rss_bytes`` (the process's maximum resident set size). Both are high-water marks
    since the process started (neither backend can reset them), so an estimator's number bounds
    its own peak from above."""
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


@contextmanager
def measured(info: dict, stage: str):
    """Record the wall-clock seconds of the block in ``info["seconds"][stage]`` and the peak
    memory after it in ``info["memory"][stage]`` (:func:`peak_memory`)."""
    t0 = time.perf_counter()
    yield
    info.setdefault("seconds", {})[stage] = time.perf_counter() - t0
    info.setdefault("memory", {})[stage] = peak_memory()


# ----------------------------------------------------------------------------- gradients
def _take(tree, j):
    return jax.tree.map(lambda x: x[j], tree)


def unstack(tree) -> list:
    """A stacked pytree (leading axis q on every leaf) -> a list of q pytrees."""
    q = jax.tree.leaves(tree)[0].shape[0]
    return [_take(tree, j) for j in range(q)]


def stack(trees: list):
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
    per_sample_loss, params, data, batch_size: int = 64, *, progress: bool | None = None
):
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
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *parts)


def query_gradients(state: State, query, *, query_mean: bool = False, params=None):
    """The query side of :func:`attribute`: stacked per-row gradients of ``query``, or with
    ``query_mean`` one vector, the mean gradient over ``query``
    (:func:`jaxrec.influence.mean_gradient`; the DEALRec score's ``g_mean``)."""
    params = state.params if params is None else params
    bs = getattr(state.options, "query_batch_size", 64)
    if query_mean:
        g = mean_gradient(
            state.per_sample_loss, params, query, getattr(state.options, "batch_size", 4096)
        )
        return jax.tree.map(lambda x: x[None], g)
    return per_sample_gradients(state.per_sample_loss, params, query, bs)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _pairwise_fn(per_sample_loss):
    """``(params, batch, vectors) -> [B, q]``: ``g_i . u_j`` for every row and every stacked
    vector, by one ``jax.linearize`` of the per-sample losses and a ``vmap`` of its JVP."""

    def fn(p, batch, vectors):
        _, jvp = jax.linearize(lambda q: per_sample_loss(q, batch), p)
        return jax.vmap(jvp)(vectors).T

    return fn


def pairwise_scores(
    per_sample_loss, params, train, vectors, batch_size: int = 4096, *, progress=None
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


def batch_reduce(fn, params, data, init, batch_size: int, *, extra=(), desc="fit", progress=None):
    """``acc = fn(params, batch, weight, acc, *extra)`` over every padded, sharded batch of
    ``data`` (``weight`` 1 for real rows, 0 for padding), jitted once per batch shape.
    Returns the final ``acc``: the fitting passes (covariances, Gram matrices, norms)."""
    mesh = data_mesh()
    params, extra, acc = replicate((params, extra, init), mesh)
    jfn = jax.jit(fn)
    for _, batch, weight in strata_batches(data, batch_size, mesh, desc=desc, progress=progress):
        acc = jfn(params, batch, weight, acc, *extra)
    return acc


# ----------------------------------------------------------------------------- the solvers
def effective_damping(damping: float, convention: str, scale: float) -> tuple[float, float]:
    """``(lam, factor)`` with ``u = factor (H + lam I)^-1 v``: the conventions of
    :func:`jaxrec.influence.inverse_hvp` (``dealrec``: ``scale (H + scale damping I)^-1``;
    ``standard``: ``(H + damping I)^-1``)."""
    if convention not in ("dealrec", "standard"):
        raise UserError(f"unknown convention {convention!r}; expected dealrec or standard")
    if damping < 0:
        raise UserError(f"damping must be >= 0, got damping={damping}")
    return (scale * damping, scale) if convention == "dealrec" else (damping, 1.0)


def _fit_influence(state: State, progress=None) -> dict:
    """The query-independent part of a solver: ``exact``: the dense Hessian, eigendecomposed
    (float64); ``arnoldi``: its top eigenpairs; ``cg`` / ``lissa``: nothing (each query needs
    its own solve)."""
    from jaxrec.influence import arnoldi
    from jaxrec.influence.exact import hessian_matrix
    from jaxrec.influence.operator import FullHessian

    opts = state.options
    name = solver_name(opts.solver)
    lam, _ = effective_damping(opts.damping, opts.convention, opts.scale)
    if name == "exact":
        op = FullHessian(state.loss, state.params, state.data, opts.solver.batch_size)
        h = hessian_matrix(op, opts.solver.chunk)
        eig, vec = np.linalg.eigh(h)
        if np.min(np.abs(eig + lam)) <= 1e-12 * max(1.0, np.max(np.abs(eig))):
            raise UserError(f"H + {lam:g} I is singular; increase damping=")
        return {"eigenvalues": eig, "eigenvectors": vec}
    if name == "arnoldi":
        op = FullHessian(state.loss, state.params, state.data, opts.solver.batch_size)
        eig, vecs, _ = arnoldi.eigenpairs(
            op,
            rank=opts.solver.rank,
            iterations=opts.solver.iterations,
            key=jax.random.PRNGKey(opts.solver.seed),
            progress=progress,
        )
        if np.any(eig + lam <= 0):
            raise UserError(
                f"Arnoldi found eigenvalue {eig.min():.3g} <= -damping; increase damping="
            )
        return {"eigenvalues": eig, "eigenvectors": vecs}
    return {}


def _precondition_influence(state: State, grads, progress=None):
    """``factor (H + lam I)^-1 g_j`` for every stacked query gradient."""
    from jaxrec.influence import inverse_hvp

    opts = state.options
    name = solver_name(opts.solver)
    lam, factor = effective_damping(opts.damping, opts.convention, opts.scale)
    flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)  # [q, d]
    unravel = ravel_pytree(state.params)[1]
    if name == "exact":
        eig, vec = state.fitted["eigenvalues"], state.fitted["eigenvectors"]
        rhs = np.asarray(flat, np.float64).T
        x = factor * (vec @ ((vec.T @ rhs) / (eig + lam)[:, None]))
        return jax.vmap(unravel)(jnp.asarray(x.T, flat.dtype))
    if name == "arnoldi":
        eig, vecs = state.fitted["eigenvalues"], state.fitted["eigenvectors"]
        inv = jnp.asarray(factor / (eig + lam), vecs.dtype)
        return jax.vmap(unravel)(((flat @ vecs.T) * inv) @ vecs)
    us = [
        inverse_hvp(
            state.loss,
            state.params,
            state.data,
            g,
            solver=opts.solver,
            damping=opts.damping,
            convention=opts.convention,
            scale=opts.scale,
            progress=False,
        )
        for g in unstack(grads)
    ]
    return stack(us)


def _attribute_grad_cos(state: State, train, query, query_mean, progress):
    """Grad-Cos: grad-dot divided by the norms; training norms by
    :func:`jaxrec.influence.grand_scores` (per-sample gradients, one batch at a time)."""
    from jaxrec.influence.scores import grand_scores

    opts = state.options
    g = query_gradients(state, query, query_mean=query_mean)
    dots = pairwise_scores(state.per_sample_loss, state.params, train, g, opts.batch_size)
    qn = np.asarray(jax.vmap(lambda x: jnp.sqrt(sum(jnp.sum(y**2) for y in jax.tree.leaves(x))))(g))
    tn = grand_scores(state.per_sample_loss, state.params, train, opts.norm_batch_size)
    return dots / (
        np.asarray(tn, np.float64)[:, None] * np.asarray(qn, np.float64)[None] + opts.eps
    )


# ----------------------------------------------------------------------------- the API
def _module(options):
    """The estimator module of an options instance: ``fit_state(state, progress)`` (the
    fitted dict), and either ``precondition(state, grads, progress)`` (linear estimators) or
    ``attribute(state, train, query, query_mean, progress)``."""
    for cls, (mod, _) in _estimators().items():
        if type(options) is cls:
            return mod
    names = ", ".join(c.__name__ for c in _estimators())
    raise UserError(f"options must be one of {names}; got {type(options).__name__}")


class _Local:
    """This module's own estimators, in the interface of the estimator modules."""

    def __init__(self, fit_state=None, precondition=None, attribute=None):
        self.fit_state = fit_state or (lambda state, progress=None: {})
        if precondition:
            self.precondition = precondition
        if attribute:
            self.attribute = attribute


@functools.cache
def _estimators() -> dict:
    """``{options class: (module, name)}`` of every estimator."""
    out = {
        InfluenceOptions: (
            _Local(_fit_influence, precondition=_precondition_influence),
            "influence",
        ),
        GradDotOptions: (_Local(precondition=lambda s, g, progress=None: g), "grad-dot"),
        GradCosOptions: (_Local(attribute=_attribute_grad_cos), "grad-cos"),
    }
    for name in ("kfac", "trak", "tracin", "datainf"):
        mod = importlib.import_module(f"jaxrec.influence.{name}")
        for cls, label in mod.ESTIMATORS.items():
            out[cls] = (mod, label)
    return out


def estimator_name(options) -> str:
    """The short name of an options instance (``kfac``, ``ekfac``, ``trak``, ...)."""
    _module(options)
    return _estimators()[type(options)][1]


def fit(
    options,
    loss,
    per_sample_loss,
    params,
    data,
    *,
    output: Callable | None = None,
    progress: bool | None = None,
) -> State:
    """Fit an estimator: its query-independent, expensive part, computed once.

    Args:
      options: an estimator's options dataclass (:class:`InfluenceOptions`,
        :class:`GradDotOptions`, :class:`GradCosOptions`, ``KFACOptions``, ``EKFACOptions``,
        ``TRAKOptions``, ``TracInOptions``, ``DataInfOptions``); it selects the estimator.
      loss: ``loss(params, batch) -> scalar``, the mean training loss (its Hessian).
      per_sample_loss: ``per_sample_loss(params, batch) -> [B]``.
      params: a parameter pytree, or :class:`Checkpoints` (TracIn-CP, TRAK ensembles).
      data: the training data the curvature is fitted on (pytree, leading axis n, or a list
        of strata).
      output: ``output(params, batch) -> [B, K]`` (or ``[B]``), whitened model outputs whose
        Gauss-Newton matrix ``(1/n) sum_i J_i^T J_i`` K-FAC (``fisher="gauss-newton"`` /
        ``"sampled"``) and TRAK use; see docs/influence.md. Ignored by the others.
    Returns:
      a :class:`State`; ``state.info`` holds the fit's seconds and peak memory.
    """
    mod = _module(options)
    if isinstance(params, Checkpoints) and type(options).__name__ not in (
        "TracInOptions",
        "TRAKOptions",
    ):
        raise UserError(f"{type(options).__name__} takes one params pytree, not Checkpoints")
    state = State(options, loss, per_sample_loss, params, data, output)
    with measured(state.info, "fit"):
        state.fitted = mod.fit_state(state, progress=progress)
        jax.block_until_ready(jax.tree.leaves(state.fitted))
    return state


def attribute(
    state: State,
    train,
    query,
    *,
    query_mean: bool = False,
    return_info: bool = False,
    progress: bool | None = None,
):
    """Scores ``a[i, j]`` of every training row ``i`` of ``train`` against every query row ``j``
    of ``query``, with the estimator fitted by :func:`fit`.

    Args:
      state: from :func:`fit`.
      train: the samples to score (pytree or list of strata, in order).
      query: the samples whose loss is attributed (one column per row).
      query_mean: one column only: the query is the mean loss over ``query`` (its mean
        gradient). With ``query = train`` and the influence estimator this is the DEALRec
        score, paper Eq. 11, up to its constant ``1 / n^2``: see :func:`dealrec_scores`.
      return_info: also return ``info`` (seconds and peak memory of fit and attribute).
    Returns:
      ``[n_train, n_query]`` float64 (``[n_train, 1]`` with ``query_mean``), or ``(a, info)``.
    """
    mod = _module(state.options)
    info = {k: dict(v) for k, v in state.info.items()}
    with measured(info, "attribute"):
        if hasattr(mod, "attribute"):
            a = mod.attribute(state, train, query, query_mean, progress)
        else:
            grads = query_gradients(state, query, query_mean=query_mean)
            vectors = mod.precondition(state, grads, progress=progress)
            a = pairwise_scores(
                state.per_sample_loss,
                state.params,
                train,
                vectors,
                getattr(state.options, "batch_size", 4096),
                progress=progress,
            )
    info["estimator"] = estimator_name(state.options)
    info["seconds"]["total"] = info["seconds"]["fit"] + info["seconds"]["attribute"]
    a = np.asarray(a, np.float64)
    return (a, info) if return_info else a


def dealrec_scores(state: State, train) -> np.ndarray:
    """The DEALRec influence score (paper Eq. 11) with any linear estimator's ``M`` in place of
    ``H^-1``: ``s_i = g_i . M g_mean / n^2`` over ``train`` (``[n]``). With
    :class:`InfluenceOptions` it is :func:`jaxrec.influence.influence_scores`'s score."""
    n = total_size(train)
    return attribute(state, train, train, query_mean=True)[:, 0] / n**2


def influence_options(solver="cg", **kwargs) -> InfluenceOptions:
    """:class:`InfluenceOptions` with ``solver`` a name or options dataclass
    (:func:`jaxrec.influence.inverse.solver_options`); other keywords are its fields."""
    names = {f.name for f in dataclasses.fields(InfluenceOptions)}
    solver_kw = {k: v for k, v in kwargs.items() if k not in names}
    own = {k: v for k, v in kwargs.items() if k in names}
    return InfluenceOptions(solver=solver_options(solver, **solver_kw), **own)


__all__ = [
    "Checkpoints",
    "GradCosOptions",
    "GradDotOptions",
    "InfluenceOptions",
    "State",
    "attribute",
    "batch_reduce",
    "dealrec_scores",
    "effective_damping",
    "estimator_name",
    "fit",
    "influence_options",
    "measured",
    "pairwise_scores",
    "peak_memory",
    "per_sample_gradients",
    "query_gradients",
]
