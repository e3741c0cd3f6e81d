"""LiSSA (Agarwal et al., 2017), the stochastic inverse-HVP of the paper's Algorithm 1.

One recursion, the paper code's: ``h_0 = v``, ``h_t = v + (1 - d) h_{t-1} - H_t h_{t-1} / s``,
where ``H_t`` is the Hessian of the mean loss over a minibatch drawn with a PRNG key. For
``s`` above the largest minibatch eigenvalue it converges to ``s (H + s d I)^-1 v``; callers
(:func:`jaxrec.influence.inverse_hvp`) pick ``d`` and rescale for their convention.

Steps run inside ``lax.scan`` in chunks; between chunks the norm trace is checked (divergence
guard with a suggested scale) and the run stops once it has converged: the start-up transient
decays at least like ``(1 - d)^t`` (for a positive semi-definite Hessian), so 5000 steps at
the paper's ``d = 0.01`` is far more than needed; after ``(1 - d)^t <= tol`` the run stops as
soon as the change per chunk stops shrinking (only minibatch noise left).
Memory O(params + batch): the carry is ``h``, each step touches one minibatch.

Under JAX's multi-process runtime (:mod:`jaxrec.influence.hosts`) each process holds its own
rows; every process draws the same row indices from the one key (the draw of a single
process over all ``n`` rows), each device contributes the drawn rows it holds, and a ``psum``
of those rows (integers: the minibatch, not a parameter-sized vector) gives every device the
whole minibatch. Every process then runs the same HVP, so ``h``, the norm trace and the stop
step are the same on every process and equal one process's run.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxrec.base import Loss, Params
from jaxrec.influence_options import LissaOptions
from jaxrec.errors import UserError
from jax.sharding import PartitionSpec

import jaxrec.influence.hosts as hosts
from jaxrec.influence import tree as T
from jaxrec.influence.batching import Data, _disable, data_size, strata
from jaxrec.influence.hvp import hvp


def lissa_indices(key: jax.Array, step: int | jax.Array, n: int, batch_size: int) -> jax.Array:
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

    def f_strata(key, t, params, x, parts):
        kg, ki = jax.random.split(jax.random.fold_in(key, t))
        g = jax.random.categorical(kg, logp)
        branches = [
            (
                lambda x, i=i: hvp(
                    loss, params, _take(parts[i], lissa_indices(ki, 0, sizes[i], batch_size)), x
                )
            )
            for i in range(len(parts))
        ]
        return jax.lax.switch(g, branches, x)

    return f_strata


def _host_minibatch_hvp(loss, local_parts, batch_size: int):
    """Multi-process :func:`_minibatch_hvp`: ``(parts, f)``; ``parts`` are every process's
    strata as global arrays sharded along ``data`` (process ``p``'s rows in block ``p``, padded
    with zero rows to the longest process's count); ``f(key, t, params, x, parts) -> H_t x``
    runs inside ``shard_map`` over :func:`~jaxrec.influence.hosts.global_mesh` on the minibatch
    a single process would draw from the concatenation of every process's rows (strata in the
    same order on every process; a process may hold none of a stratum's rows)."""
    sizes = hosts.allgather([data_size(p) for p in local_parts])  # [P, G]
    ldev = jax.local_device_count()
    m = [max(1, -(-int(c) // ldev)) * ldev for c in sizes.max(0)]  # rows per process, padded
    blk = [mg // ldev for mg in m]  # rows per device
    ends = np.cumsum(sizes, 0)  # [P, G]: end of process p's rows in the global stratum
    starts = ends - sizes
    n = [int(x) for x in ends[-1]]

    def padded(part, rows):
        return jax.tree.map(
            lambda x: np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]),
            jax.tree.map(np.asarray, part),
        )

    parts = [hosts.shard_rows_tree(padded(p, mg)) for p, mg in zip(local_parts, m)]

    def gather(block, g, idx):
        p = jnp.searchsorted(jnp.asarray(ends[:, g]), idx, side="right")
        pos = p * m[g] + idx - jnp.asarray(starts[:, g])[p]
        lo = jax.lax.axis_index("data") * blk[g]
        own = (pos >= lo) & (pos < lo + blk[g])
        local = jnp.clip(pos - lo, 0, blk[g] - 1)

        def rows(x):
            mask = own.reshape(own.shape + (1,) * (x.ndim - 1))
            return jnp.where(mask, jnp.take(x, local, axis=0), jnp.zeros((), x.dtype))

        return jax.lax.psum(jax.tree.map(rows, block), "data")

    if len(local_parts) == 1:

        def one(key, t, params, x, parts):
            batch = gather(parts[0], 0, lissa_indices(key, t, n[0], batch_size))
            return hvp(loss, params, batch, x)

        return parts, one
    logp = jnp.log(jnp.asarray(n, jnp.float32) / sum(n))

    def f(key, t, params, x, parts):
        kg, ki = jax.random.split(jax.random.fold_in(key, t))
        g = jax.random.categorical(kg, logp)
        batches = [
            gather(parts[i], i, lissa_indices(ki, 0, n[i], batch_size)) for i in range(len(n))
        ]
        branches = [(lambda x, i=i: hvp(loss, params, batches[i], x)) for i in range(len(parts))]
        return jax.lax.switch(g, branches, x)

    return parts, f


def largest_eigenvalue(
    loss: Loss,
    params: Params,
    data: Data,
    batch_size: int,
    key: jax.Array,
    iterations: int = 30,
) -> float:
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
    x = jax.tree.unflatten(
        jax.tree.structure(params),
        [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)],
    )
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


def _chunk_runner(mb_hvp, d: float, scale: float, steps: int, chunk: int, mesh=None):
    """A jitted ``(h, t0, key, params, v, parts) -> (h, norms)``: ``chunk`` steps in one
    ``lax.scan`` (steps past ``steps`` are skipped, so one shape serves every chunk). With
    ``mesh`` (several processes) the scan runs inside ``shard_map``: ``parts`` sharded along
    ``data``, everything else replicated."""

    def run_chunk(h, t0, key, params, v, parts):
        def body(h, t):
            def step(h):
                hv = mb_hvp(key, t, params, h, parts)
                return jax.tree.map(lambda vi, hi, hvi: vi + (1 - d) * hi - hvi / scale, v, h, hv)

            if steps % chunk:  # last chunk overruns: skip steps >= steps
                h = jax.lax.cond(t < steps, step, lambda h: h, h)
            else:
                h = step(h)
            return h, T.norm(h)

        return jax.lax.scan(body, h, t0 + jnp.arange(chunk))

    if mesh is None:
        return jax.jit(run_chunk)
    rep, rows = PartitionSpec(), PartitionSpec("data")
    return jax.jit(
        jax.shard_map(
            run_chunk,
            mesh=mesh,
            in_specs=(rep, rep, rep, rep, rep, rows),
            out_specs=(rep, rep),
            check_vma=False,
        )
    )


def transient_steps(d: float, tol: float) -> int:
    """Steps after which ``(1 - d)^t <= tol``: the start-up transient of the recursion's mean
    (contraction factor ``1 - d - lambda_min / s``, at most ``1 - d`` when the Hessian is
    positive semi-definite) has shrunk below ``tol`` of where it started."""
    if tol <= 0:
        return -1
    if d <= 0:
        return 2**62
    return math.ceil(math.log(tol) / math.log1p(-d))


def _converged(changes: list[float], t: int, min_steps: int, rtol: float) -> bool:
    """Stop rule between chunks. ``changes`` are the relative changes ``|h_k - h_{k-1}| / |h|``
    over each finished chunk. Converged when (a) ``rtol`` is set and the last change is below
    it, or (b) ``min_steps`` (from :func:`transient_steps`) have run and the change has stopped
    shrinking: while the transient dominates, each chunk's change is a factor ``(1 - d)^chunk``
    smaller than the one before; once only minibatch noise is left, it stays flat."""
    if rtol > 0 and changes and changes[-1] < rtol:
        return True
    if min_steps < 0 or t < min_steps or len(changes) < 2:
        return False
    return changes[-1] >= 0.5 * changes[-2]


def _run_one(
    run_chunk, key, params, v, parts, opts, *, min_steps, limit, desc, progress, on_diverge
):
    """One LiSSA run from ``h_0 = v``: chunks until ``opts.steps`` steps or convergence.
    Returns ``(h, trace)``."""
    h, trace, changes, t = v, [], [], 0
    bar = tqdm(total=opts.steps, desc=desc, leave=False, disable=_disable(progress))
    try:
        while t < opts.steps:
            h_prev = h
            h, norms = run_chunk(h, t, key, params, v, parts)
            norms = np.asarray(norms)[: min(opts.chunk, opts.steps - t)]
            trace.append(norms)
            t += norms.size
            bar.update(norms.size)
            bad = ~np.isfinite(norms) | (norms > limit)
            if bad.any():
                i = int(np.argmax(bad))
                on_diverge(key, t - norms.size + i, float(norms[i]))
            if t < opts.steps and (opts.rtol > 0 or min_steps >= 0):
                changes.append(
                    float(T.norm(T.axpy(-1.0, h_prev, h))) / max(float(T.norm(h)), 1e-30)
                )
                if _converged(changes, t, min_steps, opts.rtol):
                    break
    finally:
        bar.close()
    return h, np.concatenate(trace)


def solve(
    loss: Loss,
    params: Params,
    data: Data,
    v: Params,
    *,
    d: float,
    scale: float = 25.0,
    options: LissaOptions | None = None,
    progress: bool | None = None,
) -> tuple[Params, dict]:
    """Run the recursion ``options.repeats`` times (independent keys) and average.

    ``data`` is one pytree or a list of strata (see :func:`_minibatch_hvp`). Each run stops
    after ``options.steps`` steps or, with ``options.tol > 0``, once it has converged (see
    :func:`_converged`). Returns ``(h, info)``: ``h`` the mean of the repeats (converges to
    ``s (H + s d I)^-1 v``); ``info`` has ``norm_trace`` ``[repeats, steps_run]`` (``||h_t||``,
    cut to the shortest run), ``steps_run`` per repeat, ``rel_std`` (standard error of the mean
    over repeats relative to ``||h||``; NaN for 1 repeat).

    Long because of its documentation and the per-repeat bookkeeping of one loop.
    """
    opts = options or LissaOptions()
    _check(opts, d, scale)
    chunk = max(1, min(opts.chunk, opts.steps))
    opts = dataclasses.replace(opts, chunk=chunk)
    local = params
    if hosts.multi():  # every process's rows: see the module docstring
        local_parts = [p for p in strata(data) if data_size(p)]
        parts, mb_hvp = _host_minibatch_hvp(loss, strata(data), opts.batch_size)
        run_chunk = _chunk_runner(mb_hvp, d, scale, opts.steps, chunk, hosts.global_mesh())
        params, v = hosts.replicate((params, v))
    else:
        parts = local_parts = [jax.device_put(jax.tree.map(jnp.asarray, p)) for p in strata(data)]
        run_chunk = _chunk_runner(
            _minibatch_hvp(loss, parts, opts.batch_size), d, scale, opts.steps, chunk
        )
    limit = 1e3 * max(float(T.norm(v)), 1e-30) / max(d, 1e-12)

    def on_diverge(key, step, value):
        # the diagnosis reads this process's rows only
        key = hosts.localize(key) if hosts.multi() else key
        _diverged(loss, local, local_parts, opts.batch_size, key, scale, d, step, value)

    results, traces = [], []
    keys = jax.random.split(jax.random.PRNGKey(opts.seed), opts.repeats)
    for r, rkey in enumerate(keys):
        h, trace = _run_one(
            run_chunk,
            hosts.replicate(rkey) if hosts.multi() else rkey,
            params,
            v,
            parts,
            opts,
            min_steps=transient_steps(d, opts.tol),
            limit=limit,
            desc=f"lissa {r + 1}/{opts.repeats}",
            progress=progress,
            on_diverge=on_diverge,
        )
        results.append(h)
        traces.append(trace)
    mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *results)
    if hosts.multi():
        mean, results = hosts.localize((mean, results))
    steps_run = [int(x.size) for x in traces]
    width = min(steps_run)
    info = {
        "steps_run": steps_run,
        "rel_std": _rel_std(results, mean),
        "norm_trace": np.stack([x[:width] for x in traces]),
        "hvps": int(sum(steps_run)),
        "max_steps": opts.steps,
        "tol": opts.tol,
    }
    return mean, info


def _check(opts: LissaOptions, d: float, scale: float) -> None:
    if scale <= 0 or not 0 <= d < 1:
        raise UserError(
            f"LiSSA needs scale > 0 and 0 <= damping fraction < 1 (got scale={scale}, d={d})"
        )
    if opts.steps < 1 or opts.repeats < 1 or opts.batch_size < 1:
        raise UserError(
            f"LiSSA needs steps, repeats and batch_size >= 1 (got steps="
            f"{opts.steps}, repeats={opts.repeats}, batch_size={opts.batch_size})"
        )


def _rel_std(results, mean) -> float:
    """Standard error of the mean over repeats, relative to ``||mean||`` (NaN for one)."""
    if len(results) < 2:
        return float("nan")
    var = sum(float(T.vdot(e, e)) for e in (T.axpy(-1.0, mean, h) for h in results))
    return math.sqrt(var / (len(results) - 1) / len(results)) / max(float(T.norm(mean)), 1e-30)


def _diverged(loss, params, data, b, key, scale, d, step, value):
    lam = largest_eigenvalue(loss, params, data, b, key)
    where = f"LiSSA diverged at step {step} (|h| = {value:.3g})"
    if not np.isfinite(lam):
        raise UserError(
            f"{where}: the Hessian-vector product is not finite; check the model, "
            f"data and parameter subset (params=)"
        )
    if lam > 0 and lam >= scale * (1 - d):
        suggest = float(f"{2 * lam:.2g}")
        raise UserError(
            f"{where}: scale={scale:g} is below the largest minibatch Hessian "
            f"eigenvalue estimate {lam:.3g}; use scale={suggest:g} or larger"
        )
    # the recursion h <- v + (1 - d) h - H h / scale grows along any eigenvalue below
    # -scale * d, the damping added to H: more damping fixes it; a larger scale only where
    # |lam| is above scale / 2
    also = f" (or use scale={2 * abs(lam):.2g})" if 2 * abs(lam) > scale else ""
    raise UserError(
        f"{where}: largest-magnitude minibatch Hessian eigenvalue estimate is "
        f"{lam:.3g} (scale={scale:g}); the Hessian has an eigenvalue below -{scale * d:.3g}, "
        f"the damping added to it (negative curvature), so increase damping=" + also
    )
