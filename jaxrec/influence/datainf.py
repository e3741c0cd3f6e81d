"""DataInf (Kwon et al. 2024, "DataInf: efficiently estimating data influence in LoRA-tuned
LLMs and diffusion models", Eq. 5-6): a closed-form inverse per parameter block.

For block ``l`` (here: one leaf of the parameter pytree; the paper's blocks are layers) the
Fisher-like ``G_l = (1/n) sum_i g_il g_il^T`` is damped and its inverse swapped with the average
(the paper's approximation, exact for n = 1):
``(G_l + lam_l I)^-1 ~ (1 / (n lam_l)) sum_i (I - g_il g_il^T / (lam_l + |g_il|^2))`` (Eq. 5,
by Sherman-Morrison per sample), so ``u_l = (v_l - (1/n) sum_i c_i g_il) / lam_l`` with
``c_i = (v_l . g_il) / (lam_l + |g_il|^2)``. The damping is the paper's (and official code's)
``lam_l = 0.1 * (n d_l)^-1 sum_i |g_il|^2`` unless ``damping`` is given.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from jaxrec.influence_options import DataInfOptions
from jaxrec.errors import UserError
from jaxrec.influence.batching import total_size
from jaxrec.base import Params
from jaxrec.influence.pairwise import State, _per_sample_grad_fn, batch_reduce


ESTIMATORS = {DataInfOptions: "datainf"}


def _sample_grads(per_sample_loss, p, batch):
    """Per-sample gradients of one batch, each leaf flattened to ``[B, d_l]``."""

    g = _per_sample_grad_fn(per_sample_loss)(p, batch)
    return jax.tree.map(lambda x: x.reshape(x.shape[0], -1), g)


def fit_state(state: State, progress: bool | None = None) -> dict:
    """``lam_l`` per block: ``damping``, or ``damping_scale`` times the mean over samples and
    entries of ``g_il^2`` (one pass of per-sample gradients)."""

    opts = state.options
    if opts.damping is not None:
        if opts.damping <= 0:
            raise UserError(f"DataInf needs damping > 0, got damping={opts.damping}")
        return {"lam": jax.tree.map(lambda p: jnp.asarray(opts.damping, p.dtype), state.params)}

    def fn(p, batch, weight, acc):
        g = _sample_grads(state.per_sample_loss, p, batch)
        return jax.tree.map(lambda a, x: a + jnp.sum(weight[:, None] * x**2), acc, g)

    init = jax.tree.map(lambda p: jnp.zeros((), p.dtype), state.params)
    sq = batch_reduce(fn, state.params, state.data, init, opts.grad_batch_size, desc="datainf")
    n = total_size(state.data)
    lam = jax.tree.map(lambda s, p: opts.damping_scale * s / (n * p.size), sq, state.params)
    if not all(float(x) > 0 for x in jax.tree.leaves(lam)):
        raise UserError("DataInf: a parameter block has zero gradients everywhere; give damping=")
    return {"lam": lam}


def precondition(state: State, grads: Params, progress: bool | None = None) -> Params:
    """Eq. 5-6 applied to the stacked query gradients: one pass of per-sample gradients over
    the fitted data accumulates ``sum_i c_ij g_il`` for every query ``j`` and block ``l``."""

    opts = state.options
    lam = state.fitted["lam"]
    flat_q = jax.tree.map(lambda x: x.reshape(x.shape[0], -1), grads)

    def fn(p, batch, weight, acc, vq, lam):
        g = _sample_grads(state.per_sample_loss, p, batch)

        def block(a, gl, v, lm):
            c = (v @ gl.T) / (lm + jnp.sum(gl**2, 1))[None, :]  # [q, B]
            return a + (c * weight[None, :]) @ gl

        return jax.tree.map(block, acc, g, vq, lam)

    acc = batch_reduce(
        fn,
        state.params,
        state.data,
        jax.tree.map(jnp.zeros_like, flat_q),
        opts.grad_batch_size,
        extra=(flat_q, lam),
        desc="datainf",
    )
    n = total_size(state.data)
    u = jax.tree.map(lambda v, a, lm: (v - a / n) / lm, flat_q, acc, lam)
    return jax.tree.map(lambda x, g: x.reshape(g.shape), u, grads)
