"""K-FAC and EK-FAC influence for Flax ``nn.Dense`` layers (George et al. 2018, "Fast
approximate natural gradient descent in a Kronecker-factored eigenbasis"; Grosse et al. 2023,
"Studying large language model generalization with influence functions", Sec. 2.2-2.3).

For a Dense layer ``y_t = a_t W + b`` (``t`` over the token axes a layer is applied to, ``a``
with a trailing 1 when its bias is attributed) the curvature block of the layer is
approximated by ``A (x) S`` with ``A = (1/n) sum_i sum_t a_it a_it^T`` and ``S = (1/n) sum_i
sum_r sum_t s_irt s_irt^T``, ``s`` the gradients of the per-sample "pseudo-losses" ``r`` with
respect to the pre-activations ``y``:

- ``fisher="empirical"``: one pseudo-loss, the sample's own loss (the empirical Fisher;
  kronfluence's ``use_empirical_fisher=True``);
- ``fisher="gauss-newton"``: the ``K`` whitened outputs ``o_ik`` of ``output(params, batch)
  -> [B, K]`` (a loss ``l(o)`` with ``d^2 l / do^2 = I``, e.g. squared error, or logits
  pre-multiplied by the square root of the loss Hessian), so ``sum_r J^T J`` is the exact
  Gauss-Newton matrix ``(1/n) sum_i J_i^T J_i``;
- ``fisher="sampled"``: one pseudo-loss ``sum_k e_ik o_ik`` with ``e ~ N(0, I)``: the true
  Fisher by Monte Carlo (Martens & Grosse 2015's sampled labels for whitened outputs; the
  default of kronfluence, whose labels are drawn from the model's predictive distribution).

``A = Q_A L_A Q_A^T``, ``S = Q_S L_S Q_S^T``; K-FAC applies ``(A (x) S + lam I)^-1`` in that
eigenbasis with eigenvalues ``L_A (x) L_S``; EK-FAC replaces them by the diagonal of the
curvature in the same basis, ``L_ab = (1/n) sum_i sum_r ((Q_A^T G_ir Q_S)_ab)^2``, ``G_ir =
sum_t a_it s_irt^T`` (George et al. Eq. 10; Grosse et al. Eq. 20). ``damping=None`` uses
kronfluence's heuristic ``lam = 0.1 x mean eigenvalue`` per layer.

Activations and pre-activation gradients are captured from the pure functions themselves:
every ``nn.Dense`` call made while ``per_sample_loss`` (or ``output``) runs is intercepted
(``flax.linen.intercept_methods``), its input recorded and a zero perturbation added to its
output, whose gradient is ``s``. The pytree paths of the attributed parameters must end in
``<module path>/kernel`` (and ``/bias``); any other parameter is an error (restrict
``params`` with :class:`jaxrec.influence.ParamSubset`). A model must treat batch rows
independently (no batch statistics). Padding tokens are not masked out of ``A``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.influence_options import EKFACOptions, KFACOptions
from jaxrec.base import Batch, Params
from jaxrec.errors import UserError
from jaxrec.influence.batching import data_size, strata, total_size
from jaxrec.influence.pairwise import State, batch_reduce
from jaxrec.influence.params import path_string

FISHERS = ("empirical", "gauss-newton", "sampled")


ESTIMATORS = {KFACOptions: "kfac", EKFACOptions: "ekfac"}


def _is_dense(ctx) -> bool:
    return ctx.method_name == "__call__" and isinstance(ctx.module, nn.Dense)


def _module_path(ctx) -> str:
    return "/".join(str(x) for x in ctx.module.path)


def dense_layers(fn: Callable[..., Any], params: Params, batch: Batch) -> dict:
    """The Dense layers ``fn(params, batch)`` calls whose kernel is in ``params``:
    ``{module path: {"kernel": param path, "bias": param path or None}}``. Raises a UserError
    naming any parameter that no such layer covers."""
    calls = []

    def icpt(next_fun, args, kwargs, ctx):
        if _is_dense(ctx):
            calls.append(_module_path(ctx))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
        jax.eval_shape(lambda q, b: fn(q, b), params, batch)  # a fresh function: no cached trace
    paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

    def find(mp, leaf):
        tail = f"{mp}/{leaf}"
        hits = [p for p in paths if p == tail or p.endswith("/" + tail)]
        return hits[0] if hits else None

    layers = {}
    for mp in dict.fromkeys(calls):
        kernel = find(mp, "kernel")
        if kernel is not None:
            layers[mp] = {"kernel": kernel, "bias": find(mp, "bias")}
    covered = {p for v in layers.values() for p in v.values() if p}
    rest = [p for p in paths if p not in covered]
    if rest:
        raise UserError(
            f"K-FAC covers Dense kernels and biases only; parameter {rest[0]!r} is not one "
            f"({len(rest)} uncovered; Dense layers called: {', '.join(layers) or 'none'}); "
            "restrict params= to Dense layers (ParamSubset)"
        )
    return layers


def _tapped(fn, layers):
    """``fn(params, batch)`` -> ``f(params, perturb, batch) -> (out, acts)``: each call of a
    Dense layer in ``layers`` gets ``perturb[key]`` added to its output and its input
    recorded in ``acts[key]`` (``key = "<module path>#<call index>"``)."""

    def f(params, perturb, batch):
        acts, count = {}, collections.Counter()

        def icpt(next_fun, args, kwargs, ctx):
            if _is_dense(ctx) and _module_path(ctx) in layers:
                mp = _module_path(ctx)
                key = f"{mp}#{count[mp]}"
                count[mp] += 1
                acts[key] = args[0] if args else kwargs["inputs"]
                y = next_fun(*args, **kwargs)
                return y + perturb[key]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(icpt):
            out = fn(params, batch)
        return out, acts

    return f


def _indexed(data) -> list:
    """``data``'s strata, each paired with its rows' global indices (the sampled Fisher draws
    each row's labels from ``fold_in(key, row)``, so batching and devices do not change it)."""

    out, start = [], 0
    for part in strata(data):
        m = data_size(part)
        out.append((part, np.arange(start, start + m, dtype=np.int32)))
        start += m
    return out


def _stats(state, layers, p, batch, weight, key):
    """One batch's activations ``{layer: [B, T, in(+1)]}`` (rows weighted) and pseudo-loss
    pre-activation gradients ``{layer: [R, B, T, out]}`` (see the module docstring)."""
    opts = state.options
    batch, row_ids = batch
    fn = state.per_sample_loss if opts.fisher == "empirical" else state.output
    tapped = _tapped(fn, layers)
    zeros = {
        k: jnp.zeros(s.shape, s.dtype) for k, s in _output_shapes(fn, layers, p, batch).items()
    }

    def run(pert):
        out, acts = tapped(p, pert, batch)
        return jnp.reshape(out, (out.shape[0], -1)), acts

    out, vjp, acts = jax.vjp(run, zeros, has_aux=True)
    b, k = out.shape
    w = weight.astype(out.dtype)
    if opts.fisher == "gauss-newton":
        cot = jnp.eye(k, dtype=out.dtype)[:, None, :] * w[None, :, None]  # [K, B, K]
    elif opts.fisher == "sampled":
        draw = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), (k,), out.dtype))
        cot = (draw(row_ids) * w[:, None])[None]
    else:
        cot = w[None, :, None]
    grads = jax.vmap(lambda c: vjp(c)[0])(cot)  # {key: [R, B, ..., out]}
    a_out, s_out = {}, {}
    for mp, spec in layers.items():
        keys = sorted((x for x in acts if x.rsplit("#", 1)[0] == mp), key=_call_index)
        a = jnp.concatenate([acts[x].reshape(b, -1, acts[x].shape[-1]) for x in keys], 1)
        s = jnp.concatenate(
            [grads[x].reshape(grads[x].shape[0], b, -1, grads[x].shape[-1]) for x in keys], 2
        )
        if spec["bias"] is not None:
            a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], -1)
        a_out[mp] = a * w[:, None, None]
        s_out[mp] = s
    return a_out, s_out


def _call_index(key: str) -> int:
    return int(key.rsplit("#", 1)[1])


def _output_shapes(fn, layers, p, batch) -> dict:
    """``{key: ShapeDtypeStruct}`` of every intercepted Dense call's output."""
    shapes: dict = {}
    count: collections.Counter = collections.Counter()

    def icpt(next_fun, args, kwargs, ctx):
        y = next_fun(*args, **kwargs)
        if _is_dense(ctx) and _module_path(ctx) in layers:
            mp = _module_path(ctx)
            shapes[f"{mp}#{count[mp]}"] = jax.ShapeDtypeStruct(y.shape, y.dtype)
            count[mp] += 1
        return y

    with nn.intercept_methods(icpt):
        jax.eval_shape(lambda q, b: fn(q, b), p, batch)  # a fresh function: no cached trace
    return shapes


def fit_state(state: State, progress: bool | None = None) -> dict:
    """Covariances ``A``, ``S`` per layer (one pass), their eigendecompositions (float64) and,
    for EK-FAC, the corrected eigenvalues (a second pass). Returns ``{"layers": {module path:
    {"kernel", "bias", "qa", "qs", "eigenvalues" [in(+1), out], "damping"}}}``.

    Long because: K-FAC's covariance pass and EK-FAC's eigenvalue pass share the layer
    table, the rotations and the batch sizes; split, they would pass all of it around."""

    opts = state.options
    if opts.fisher not in FISHERS:
        raise UserError(f"fisher={opts.fisher!r}: expected one of {', '.join(FISHERS)}")
    if opts.fisher != "empirical" and state.output is None:
        raise UserError(f"fisher={opts.fisher!r} needs output= (whitened model outputs)")
    first = jax.tree.map(lambda x: np.asarray(x)[:1], strata(state.data)[0])
    fn = state.per_sample_loss if opts.fisher == "empirical" else state.output
    # fn is not None: a fisher other than "empirical" without output= was refused above
    layers = dense_layers(fn, state.params, first)  # type: ignore[arg-type]
    if not layers:
        raise UserError("K-FAC found no Dense layer with parameters in params=")
    n = total_size(state.data)
    data = _indexed(state.data)
    base = jax.random.PRNGKey(opts.seed)
    dtype = jax.tree.leaves(state.params)[0].dtype
    sizes = _sizes(state, layers)

    def cov(p, batch, weight, acc):
        a, s = _stats(state, layers, p, batch, weight, base)
        return {
            mp: (
                acc[mp][0] + jnp.einsum("bti,btj->ij", a[mp], a[mp]),
                acc[mp][1] + jnp.einsum("rbto,rbtp->op", s[mp], s[mp]),
            )
            for mp in layers
        }

    init = {
        mp: (jnp.zeros((i, i), dtype), jnp.zeros((o, o), dtype)) for mp, (i, o) in sizes.items()
    }
    covs = batch_reduce(cov, state.params, data, init, opts.fit_batch_size, desc="kfac covariances")
    out = {}
    for mp, (a_cov, s_cov) in covs.items():
        la, qa = np.linalg.eigh(np.asarray(a_cov, np.float64) / n)
        ls, qs = np.linalg.eigh(np.asarray(s_cov, np.float64) / n)
        out[mp] = {
            **layers[mp],
            "qa": qa,
            "qs": qs,
            "eigenvalues": np.outer(np.clip(la, 0, None), np.clip(ls, 0, None)),
        }
    if isinstance(opts, EKFACOptions):
        rot = {
            mp: (jnp.asarray(v["qa"], dtype), jnp.asarray(v["qs"], dtype)) for mp, v in out.items()
        }

        def corr(p, batch, weight, acc, rot):
            a, s = _stats(state, layers, p, batch, weight, base)
            new: dict = {}
            for mp in layers:
                qa, qs = rot[mp]
                g = jnp.einsum("bti,rbto->rbio", a[mp] @ qa, s[mp] @ qs)
                new[mp] = acc[mp] + jnp.sum(g**2, (0, 1))
            return new

        zeros = {mp: jnp.zeros(sizes[mp], dtype) for mp in layers}
        lams = batch_reduce(
            corr,
            state.params,
            data,
            zeros,
            opts.fit_batch_size,
            extra=(rot,),
            desc="ekfac eigenvalues",
        )
        for mp in layers:
            out[mp]["eigenvalues"] = np.asarray(lams[mp], np.float64) / n
    for v in out.values():
        lam = opts.damping
        if lam is None:
            lam = opts.damping_scale * float(np.mean(v["eigenvalues"]))
        if lam < 0 or (lam == 0 and np.min(v["eigenvalues"]) <= 0):
            raise UserError(f"K-FAC needs damping > 0 here (damping={opts.damping})")
        v["damping"] = float(lam)
    return {"layers": out}


def _sizes(state, layers) -> dict:
    """``{module path: (in(+1), out)}``."""
    leaves = {path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    return {
        mp: (leaves[v["kernel"]].shape[0] + (v["bias"] is not None), leaves[v["kernel"]].shape[1])
        for mp, v in layers.items()
    }


def precondition(state: State, grads: Params, progress: bool | None = None) -> Params:
    """``(A (x) S + lam I)^-1 g_j`` (K-FAC) or with the corrected eigenvalues (EK-FAC), per
    layer, in the Kronecker eigenbasis, for every stacked query gradient."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    index = {path_string(p): i for i, (p, _) in enumerate(flat)}
    leaves = [x for _, x in flat]
    for v in state.fitted["layers"].values():
        ki = index[v["kernel"]]
        m = np.asarray(leaves[ki], np.float64)  # [q, in, out]
        if v["bias"] is not None:
            m = np.concatenate([m, np.asarray(leaves[index[v["bias"]]], np.float64)[:, None]], 1)
        qa, qs = v["qa"], v["qs"]
        r = np.einsum("ia,qio,ob->qab", qa, m, qs) / (v["eigenvalues"] + v["damping"])
        back = np.einsum("ia,qab,ob->qio", qa, r, qs)
        dtype = leaves[ki].dtype
        if v["bias"] is not None:
            leaves[index[v["bias"]]] = jnp.asarray(back[:, -1], dtype)
            back = back[:, :-1]
        leaves[ki] = jnp.asarray(back, dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves)
