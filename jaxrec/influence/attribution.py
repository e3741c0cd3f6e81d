"""One attribution API: ``state = fit(options, ...)`` once, then ``attribute(state, train, query)``.

The shape of dattri's ``cache`` / ``attribute`` and kronfluence's ``fit_all_factors`` then
``compute_pairwise_scores``: the expensive, query-independent part (a Hessian, its inverse or
eigenpairs, Kronecker factors, projected Gauss-Newton matrices) is fitted once; scores
``a[i, j]`` of every training sample ``i`` against every query ``j`` come after, as an
``[n_train, n_query]`` NumPy array::

    from jaxrec.influence import attribution as at
    state = at.fit(at.KFACOptions(), loss, per_sample_loss, params, data)
    a = at.attribute(state, train, query)       # [n_train, n_query]
    a, info = at.attribute_with_info(state, train, query)   # + seconds, peak memory

Every estimator takes the engine's pure functions, ``loss(params, batch) -> scalar`` (the mean)
and ``per_sample_loss(params, batch) -> [B]``, a parameter pytree (or :class:`Checkpoints` for
TracIn-CP and TRAK's ensemble) and data pytrees with a leading sample axis (or lists of strata).
The sign convention is the one of the LDS study (:mod:`jaxrec.lds`): ``a[i, j] = g_i . M g_j``
with ``g`` loss gradients and ``M`` the estimator's preconditioner (an inverse Hessian,
Gauss-Newton or Fisher approximation; the identity for grad-dot), so a large positive
``a[i, j]`` means that up-weighting training sample ``i`` lowers query ``j``'s loss (Koh &
Liang 2017, Eq. 2 without its minus sign).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxrec.base import Loss, Params, PerSampleLoss
from jaxrec.influence_options import CGOptions
from jaxrec.config_io import option
from jaxrec.errors import UserError
from jaxrec.influence import arnoldi, datainf, kfac, tracin, trak
from jaxrec.influence.batching import Data, total_size
from jaxrec.influence.exact import hessian_matrix
from jaxrec.influence.inverse import SolverOptions, inverse_hvp, solver_name, solver_options
from jaxrec.influence.operator import FullHessian
from jaxrec.influence.pairwise import (
    Checkpoints,
    State,
    batch_reduce,
    effective_damping,
    measured,
    pairwise_scores,
    peak_memory,
    per_sample_gradients,
    query_gradients,
    stack,
    unstack,
)
from jaxrec.influence.scores import grand_scores


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


def _fit_influence(state: State, progress=None) -> dict:
    """The query-independent part of a solver: ``exact``: the dense Hessian, eigendecomposed
    (float64); ``arnoldi``: its top eigenpairs; ``cg`` / ``lissa``: nothing (each query needs
    its own solve)."""
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
def _estimators() -> dict[type, tuple[Any, str]]:
    """``{options class: (module, name)}`` of every estimator."""
    out: dict[type, tuple[Any, str]] = {
        InfluenceOptions: (
            _Local(_fit_influence, precondition=_precondition_influence),
            "influence",
        ),
        GradDotOptions: (_Local(precondition=lambda s, g, progress=None: g), "grad-dot"),
        GradCosOptions: (_Local(attribute=_attribute_grad_cos), "grad-cos"),
    }
    for mod in (kfac, trak, tracin, datainf):
        for cls, label in mod.ESTIMATORS.items():  # type: ignore[attr-defined]
            out[cls] = (mod, label)
    return out


def estimator_name(options: Any) -> str:
    """The short name of an options instance (``kfac``, ``ekfac``, ``trak``, ...)."""
    _module(options)
    return _estimators()[type(options)][1]


def fit(
    options: Any,
    loss: Loss,
    per_sample_loss: PerSampleLoss,
    params: Params | Checkpoints,
    data: Data,
    *,
    output: Callable | None = None,
    query_loss: PerSampleLoss | None = None,
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
      query_loss: the queries' ``(params, batch) -> [B]`` loss when it differs from
        ``per_sample_loss`` (say a validation loss without the training loss's regulariser);
        default ``per_sample_loss``.
    Returns:
      a :class:`State`; ``state.info`` holds the fit's seconds and peak memory.
    """
    mod = _module(options)
    if isinstance(params, Checkpoints) and type(options).__name__ not in (
        "TracInOptions",
        "TRAKOptions",
    ):
        raise UserError(f"{type(options).__name__} takes one params pytree, not Checkpoints")
    state = State(options, loss, per_sample_loss, params, data, output, query_loss=query_loss)
    with measured(state.info, "fit"):
        state.fitted = mod.fit_state(state, progress=progress)
        jax.block_until_ready(jax.tree.leaves(state.fitted))
    return state


def attribute(
    state: State,
    train: Data,
    query: Data,
    *,
    query_mean: bool = False,
    progress: bool | None = None,
) -> np.ndarray:
    """Scores ``a[i, j]`` of every training row ``i`` of ``train`` against every query row ``j``
    of ``query``, with the estimator fitted by :func:`fit` (:func:`attribute_with_info` also
    returns their cost).

    Args:
      state: from :func:`fit`.
      train: the samples to score (pytree, list of strata in order, or
        :class:`~jaxrec.influence.batching.Strata`: rows come back in its data set's order).
      query: the samples whose loss is attributed (one column per row).
      query_mean: one column only: the query is the mean loss over ``query`` (its mean
        gradient). With ``query = train`` and the influence estimator this is the DEALRec
        score, paper Eq. 11, up to its constant ``1 / n^2``: see :func:`risk_scores`.
    Returns:
      ``[n_train, n_query]`` float64 (``[n_train, 1]`` with ``query_mean``).
    """
    return attribute_with_info(state, train, query, query_mean=query_mean, progress=progress)[0]


def attribute_with_info(
    state: State,
    train: Data,
    query: Data,
    *,
    query_mean: bool = False,
    progress: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """:func:`attribute`'s scores and ``info``: ``estimator`` (its short name), ``seconds``
    (``fit``, ``attribute``, ``total``) and ``memory`` (peak memory after each,
    :func:`peak_memory`).

    Returns:
      ``(a [n_train, n_query] float64, info)``.
    """
    mod = _module(state.options)
    info: dict[str, Any] = {k: dict(v) for k, v in state.info.items()}
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
    return np.asarray(a, np.float64), info


def risk_scores(state: State, train: Data) -> np.ndarray:
    """Each training sample's influence on the mean training loss (the training risk) with
    any estimator's ``M``: ``s_i = g_i . M g_mean / n^2`` over ``train`` (``[n]``). With
    :class:`InfluenceOptions` it is the DEALRec score of paper Eq. 11,
    :func:`jaxrec.influence.influence_scores`'s score; the influence stage's score, with its
    per-user loss and negative draws, is :func:`jaxrec.influence.dealrec.dealrec_scores`."""
    n = total_size(train)
    return attribute(state, train, train, query_mean=True)[:, 0] / n**2


def influence_options(solver: str | SolverOptions = "cg", **kwargs: Any) -> InfluenceOptions:
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
    "attribute_with_info",
    "batch_reduce",
    "effective_damping",
    "estimator_name",
    "fit",
    "influence_options",
    "measured",
    "pairwise_scores",
    "peak_memory",
    "per_sample_gradients",
    "query_gradients",
    "risk_scores",
]
