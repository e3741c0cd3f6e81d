"""``dealrec influence``: score every training user of a trained SASRec surrogate.

``--score influence`` (default): ``v`` = mean gradient, ``u = H^-1 v`` by the chosen solver,
``score_i = g_i . u / n^2`` (paper Eq. 11, Algorithm 1); ``--score grand``: per-sample gradient
norm; ``--score el2n``: mean over positions of ``||(sigmoid(pos) - 1, sigmoid(neg))||_2``.
Users are split into length buckets cut to the narrowest width that holds them (the model
gives the same numbers at any such width), which is most of the speed on short-history data.
Writes float32 ``OUT.npy`` + manifest (and ``OUT_trace.npy``, the LiSSA norm trace) atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import InfluenceConfig, to_dict
from jaxrec.data.scorefiles import atomic_write_bytes, save_scores
from jaxrec.errors import UserError
from jaxrec.influence.inverse import CONVENTIONS, SOLVERS, inverse_hvp
from jaxrec.influence.params import ParamSubset
from jaxrec.influence.scores import el2n_scores, grand_scores, mean_gradient, sample_scores

SCORES = ("influence", "grand", "el2n")
# Two buckets: 87% of Games users fit in width 8; every extra bucket costs one more compilation
# of each jitted function (mean gradient, the LiSSA switch branch, scores), which on a CPU
# outweighs the padding it saves (measured: 8/16/32/50 took 65 s, 8/50 57 s).
WIDTHS = (8, 50)
KEYS = ("inputs", "targets", "negatives")


def width_strata(data: dict, max_len: int, widths=WIDTHS):
    """Split rows into buckets by number of target positions, each cut to its width.

    Returns ``(order, parts)``: ``parts[g]`` holds rows ``order[start_g:end_g]`` (the parts
    concatenated are ``data[order]``), cut to their last ``w_g`` columns.
    """
    lengths = (np.asarray(data["targets"]) > 0).sum(1)
    widths = sorted({min(w, max_len) for w in widths} | {max_len})
    bucket = np.searchsorted(widths, lengths)           # first width >= length
    order, parts = [], []
    for g, w in enumerate(widths):
        rows = np.flatnonzero(bucket == g)
        if rows.size:
            order.append(rows)
            parts.append({k: np.ascontiguousarray(np.asarray(data[k])[rows, -w:]) for k in KEYS})
    return np.concatenate(order), parts


def el2n_error(model):
    """EL2N error of a SASRec sample: mean over its target positions of the L2 norm of the
    error vector ``(sigmoid(pos_logit) - 1, sigmoid(neg_logit) - 0)``; 0 without positions."""
    from jaxrec.models import sasrec

    def error(params, batch):
        pos, neg, mask = sasrec.position_logits(model, params, batch)
        e = jnp.sqrt((jax.nn.sigmoid(pos) - 1.0) ** 2 + jax.nn.sigmoid(neg) ** 2)
        return jnp.sum(jnp.where(mask, e, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)

    return error


def solver_options(cfg: InfluenceConfig) -> dict:
    """The options ``inverse_hvp`` takes for ``cfg.solver`` (named as in its docstring)."""
    key = jax.random.PRNGKey(cfg.seed)
    opts = {
        "lissa": {"steps": cfg.steps, "scale": cfg.scale, "batch_size": cfg.lissa_batch_size,
                  "repeats": cfg.repeats, "key": key, "rtol": cfg.rtol or None},
        "cg": {"tol": cfg.tol, "maxiter": cfg.maxiter, "batch_size": cfg.batch_size},
        "exact": {"batch_size": cfg.batch_size},
        "arnoldi": {"rank": cfg.rank, "iterations": cfg.iterations, "key": key,
                    "batch_size": cfg.batch_size},
    }[cfg.solver]
    if cfg.convention == "dealrec" and cfg.solver != "lissa":
        opts["scale"] = cfg.scale
    return opts


def compute(cfg: InfluenceConfig, surrogate, *, progress: bool | None = None):
    """The scores of ``cfg.score`` for every user (order of ``sequential_train.txt``).

    Returns ``(scores [n] float64/32, info)``; ``info`` has per-stage seconds and, for
    ``influence``, the solver report (LiSSA: ``norm_trace``)."""
    sub = ParamSubset(surrogate.params, cfg.params)
    order, parts = width_strata(surrogate.data, surrogate.config.max_len)
    n = order.size
    psl = sub.restrict(surrogate.per_sample_loss)
    info = {"params": sub.pattern, "n_params": sub.size, "seconds": {}}
    sec = info["seconds"]
    t = time.perf_counter()
    if cfg.score == "influence":
        v = jax.block_until_ready(mean_gradient(psl, sub.params, parts, cfg.batch_size,
                                                progress=progress))
        sec["mean_gradient"] = time.perf_counter() - t
        t = time.perf_counter()
        u, solver_info = inverse_hvp(sub.restrict(surrogate.loss), sub.params, parts, v,
                                     solver=cfg.solver, damping=cfg.damping,
                                     convention=cfg.convention, return_info=True,
                                     progress=progress, **solver_options(cfg))
        jax.block_until_ready(u)
        sec["solve"] = time.perf_counter() - t
        t = time.perf_counter()
        s = sample_scores(psl, sub.params, parts, u, cfg.batch_size, progress=progress) / n**2
        sec["scores"] = time.perf_counter() - t
        info["solver"] = solver_info
    elif cfg.score == "grand":
        s = grand_scores(psl, sub.params, parts, cfg.grand_batch_size, progress=progress)
        sec["scores"] = time.perf_counter() - t
    else:
        s = el2n_scores(el2n_error(surrogate.model), surrogate.params, parts, cfg.batch_size,
                        progress=progress)
        sec["scores"] = time.perf_counter() - t
    scores = np.empty(n, s.dtype)
    scores[order] = s
    return scores, info


def check(cfg: InfluenceConfig) -> None:
    if cfg.score not in SCORES:
        raise UserError(f"unknown score {cfg.score!r}; expected one of {', '.join(SCORES)}")
    if cfg.solver not in SOLVERS:
        raise UserError(f"unknown solver {cfg.solver!r}; expected one of {', '.join(SOLVERS)}")
    if cfg.convention not in CONVENTIONS:
        raise UserError(f"unknown convention {cfg.convention!r}; expected one of "
                        f"{', '.join(CONVENTIONS)}")
    if not cfg.out.endswith(".npy"):
        raise UserError(f"--out {cfg.out!r}: a score file name must end in .npy")


def main(cfg: InfluenceConfig) -> int:
    """Run ``dealrec influence`` and write ``cfg.out`` (+ manifest, + LiSSA trace)."""
    from jaxrec.train import load_surrogate

    check(cfg)
    t0 = time.perf_counter()
    surrogate = load_surrogate(cfg.run, cfg.data or None)
    load_s = time.perf_counter() - t0
    scores, info = compute(cfg, surrogate)
    info["seconds"]["load"] = load_s
    out = Path(cfg.out)
    extra = {"run": str(cfg.run), "score": cfg.score, "param_filter": info["params"],
             "n_params": info["n_params"],
             "timing": {k: round(v, 3) for k, v in info["seconds"].items()}}
    options = {k: v for k, v in to_dict(cfg).items() if k not in ("run", "out")}
    if cfg.score == "influence":
        solver = dict(info["solver"])
        trace = solver.pop("norm_trace", None)
        if trace is not None:
            trace_path = out.with_name(out.stem + "_trace.npy")
            atomic_write_bytes(trace_path, lambda f: np.save(f, np.asarray(trace, np.float32),
                                                             allow_pickle=False))
            solver["norm_trace_file"] = trace_path.name
            solver["final_norm"] = float(np.asarray(trace)[:, -1].mean())
        extra["solver"] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                           for k, v in solver.items()}
    save_scores(out, scores, kind=cfg.score, dataset=surrogate.dataset.fingerprint(),
                options=options, seconds=time.perf_counter() - t0, **extra)
    print(f"{out}: {cfg.score} scores of {scores.size} users "
          f"({time.perf_counter() - t0:.1f} s; {info['n_params']} parameters)")
    return 0
