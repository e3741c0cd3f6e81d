"""LiSSA (Agarwal et al., 2017), the stochastic inverse-HVP of the paper's Algorithm 1.

One recursion, the paper code's: ``h_0 = v``, ``h_t = v + (1 - d) h_{t-1} - H_t h_{t-1} / s``,
where ``H_t`` is the Hessian of the mean loss over a minibatch drawn with a PRNG key. For
``s`` above the largest minibatch eigenvalue it converges to ``s (H + s d I)^-1 v``; callers
(:func:`jaxrec.influence.inverse_hvp`) pick ``d`` and rescale for their convention.

Steps run inside ``lax.scan`` in chunks; between chunks the norm trace is checked (divergence
guard with a suggested scale) and, if ``rtol`` is set, the relative change (early stop).
Memory O(params + batch): the carry is ``h``, each step touches one minibatch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxrec.errors import UserError
from jaxrec.influence import tree as T
from jaxrec.influence.batching import _disable, data_size, strata
from jaxrec.influence.hvp import hvp


def lissa_indices(key, step, n: int, batch_size: int):
    """Row indices of step ``step``'s minibatch: uniform with replacement, or every row in
    order when ``batch_size >= n`` (then LiSSA is the deterministic full-data recursion)."""
    if batch_size >= n:
        return jnp.arange(n)
    return jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, n)


def _take(data, idx):
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)


def _minibatch_hvp(loss, parts, batch_size: int):
    """``f(key, t, params, x, parts) -> H_t x`` on step ``t``'s minibatch.

    One stratum: rows from :func:`lissa_indices`. Several strata (e.g. length buckets of
    different widths): stratum ``g`` is drawn with probability ``n_g / n``, then rows within
    it, so ``E[H_t] = sum_g (n_g / n) H_g = H``; ``lax.switch`` runs the drawn stratum's HVP,
    at that stratum's width only.
    """
    sizes = [data_size(p) for p in parts]
    if len(parts) == 1:
        def f(key, t, params, x, parts):
            batch = _take(parts[0], lissa_indices(key, t, sizes[0], batch_size))
            return hvp(loss, params, batch, x)
        return f
    logp = jnp.log(jnp.asarray(sizes, jnp.float32) / sum(sizes))

    def f(key, t, params, x, parts):
        kg, ki = jax.random.split(jax.random.fold_in(key, t))
        g = jax.random.categorical(kg, logp)
        branches = [
            (lambda x, i=i: hvp(loss, params,
                                _take(parts[i], lissa_indices(ki, 0, sizes[i], batch_size)), x))
            for i in range(len(parts))]
        return jax.lax.switch(g, branches, x)
    return f


def largest_eigenvalue(loss, params, data, batch_size: int, key, iterations: int = 30) -> float:
    """Power-iteration estimate of the dominant eigenvalue of the minibatch Hessians (a fresh
    minibatch each iteration). Used to suggest a LiSSA scale that converges."""
    parts = [jax.device_put(jax.tree.map(jnp.asarray, p)) for p in strata(data)]
    mb_hvp = _minibatch_hvp(loss, parts, batch_size)

    @jax.jit
    def step(x, i, parts):
        hx = mb_hvp(key, i, params, x, parts)
        return hx, T.vdot(x, hx)

    leaves = jax.tree.leaves(params)
    keys = jax.random.split(jax.random.fold_in(key, 7), len(leaves))
    x = jax.tree.unflatten(jax.tree.structure(params),
                           [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    x = T.scale(1.0 / T.norm(x), x)
    ray = 0.0
    for i in range(iterations):
        hx, ray = step(x, 10_000_000 + i, parts)
        nrm = T.norm(hx)
        if not np.isfinite(float(nrm)) or float(nrm) == 0.0:
            ray = float(nrm)
            break
        x = T.scale(1.0 / nrm, hx)
    return float(ray)


def solve(loss, params, data, v, *, d: float, scale: float = 25.0, steps: int = 5000,
          batch_size: int = 512, repeats: int = 1, key=None, rtol: float | None = None,
          chunk: int = 250, progress: bool | None = None):
    """Run the recursion ``repeats`` times (independent keys) and average.

    ``data`` is one pytree or a list of strata (see :func:`_minibatch_hvp`).
    Returns ``(h, info)``: ``h`` the mean of the repeats (converges to ``s (H + s d I)^-1 v``);
    ``info`` has ``norm_trace`` ``[repeats, steps_run]`` (``||h_t||``), ``steps_run``,
    ``rel_std`` (standard error of the mean over repeats relative to ``||h||``; NaN for 1).
    """
    if scale <= 0 or not 0 <= d < 1:
        raise UserError(f"LiSSA needs scale > 0 and 0 <= damping fraction < 1 "
                        f"(got scale={scale}, d={d})")
    if steps < 1 or repeats < 1 or batch_size < 1:
        raise UserError(f"LiSSA needs steps, repeats and batch_size >= 1 "
                        f"(got {steps}, {repeats}, {batch_size})")
    chunk = max(1, min(chunk, steps))
    key = jax.random.PRNGKey(0) if key is None else key
    parts = [jax.device_put(jax.tree.map(jnp.asarray, p)) for p in strata(data)]
    mb_hvp = _minibatch_hvp(loss, parts, batch_size)
    vnorm = float(T.norm(v))
    limit = 1e3 * max(vnorm, 1e-30) / max(d, 1e-12)

    @jax.jit
    def run_chunk(h, t0, key, params, v, parts):
        def body(h, t):
            def step(h):
                hv = mb_hvp(key, t, params, h, parts)
                return jax.tree.map(lambda vi, hi, hvi: vi + (1 - d) * hi - hvi / scale,
                                    v, h, hv)
            if steps % chunk:              # last chunk overruns: skip steps >= steps
                h = jax.lax.cond(t < steps, step, lambda h: h, h)
            else:
                h = step(h)
            return h, T.norm(h)
        return jax.lax.scan(body, h, t0 + jnp.arange(chunk))

    results, traces, steps_run = [], [], []
    for r, rkey in enumerate(jax.random.split(key, repeats)):
        h, trace, t = v, [], 0
        bar = tqdm(total=steps, desc=f"lissa {r + 1}/{repeats}", leave=False,
                   disable=_disable(progress))
        while t < steps:
            h_prev = h
            h, norms = run_chunk(h, t, rkey, params, v, parts)
            norms = np.asarray(norms)[: min(chunk, steps - t)]
            trace.append(norms)
            t += norms.size
            bar.update(norms.size)
            bad = ~np.isfinite(norms) | (norms > limit)
            if bad.any():
                bar.close()
                _diverged(loss, params, parts, batch_size, rkey, scale, d,
                          t - norms.size + int(np.argmax(bad)),
                          float(norms[np.argmax(bad)]))
            if rtol is not None and t < steps:
                change = float(T.norm(T.axpy(-1.0, h_prev, h))) / max(float(T.norm(h)), 1e-30)
                if change < rtol:
                    break
        bar.close()
        results.append(h)
        traces.append(np.concatenate(trace))
        steps_run.append(t)
    mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *results)
    if repeats > 1:
        var = sum(float(T.vdot(d_, d_)) for d_ in (T.axpy(-1.0, mean, h) for h in results))
        rel_std = math.sqrt(var / (repeats - 1) / repeats) / max(float(T.norm(mean)), 1e-30)
    else:
        rel_std = float("nan")
    width = min(len(x) for x in traces)
    info = {"steps_run": steps_run, "rel_std": rel_std,
            "norm_trace": np.stack([x[:width] for x in traces]),
            "hvps": int(sum(steps_run))}
    return mean, info


def _diverged(loss, params, data, b, key, scale, d, step, value):
    lam = largest_eigenvalue(loss, params, data, b, key)
    where = f"LiSSA diverged at step {step} (|h| = {value:.3g})"
    if not np.isfinite(lam):
        raise UserError(f"{where}: the Hessian-vector product is not finite; check the model, "
                        f"data and parameter filter")
    if lam > 0 and lam >= scale * (1 - d):
        suggest = float(f"{2 * lam:.2g}")
        raise UserError(f"{where}: scale {scale:g} is below the largest minibatch Hessian "
                        f"eigenvalue estimate {lam:.3g}; use --scale {suggest:g} or larger")
    raise UserError(f"{where}: largest-magnitude minibatch Hessian eigenvalue estimate is "
                    f"{lam:.3g} (scale {scale:g}); the Hessian has negative curvature, so "
                    f"increase --damping (or use --scale {max(2 * abs(lam), scale):.2g})")
