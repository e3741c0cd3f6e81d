"""``dealrec influence``: score every training user of a trained surrogate (any model).

``--score influence`` (default): :func:`jaxrec.influence.influence_scores` (paper Eq. 11,
Algorithm 1); ``--score grand``: per-sample gradient norm; ``--score el2n``: the model's EL2N
error (e.g. :func:`jaxrec.models.sasrec.el2n_error`); ``--score representation``: the surrogate's
user representation ``[n, hidden]`` (for TF-DCon / RecRanker). Users are split into length
buckets (:func:`jaxrec.data.buckets.width_strata`). Writes ``OUT.npy`` + manifest (and
``OUT_trace.npy``, the LiSSA norm trace) atomically.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from jaxrec.config import InfluenceConfig, solver_options, to_dict
from jaxrec.data.buckets import width_strata
from jaxrec.data.scorefiles import atomic_write_bytes, save_scores
from jaxrec.errors import UserError

# Library errors name Python arguments; these are the flags that set them.
_FLAGS = {
    "damping": "--damping",
    "scale": "--scale",
    "params": "--params",
    "solver": "--solver",
    "steps": "--steps",
    "repeats": "--repeats",
    "batch_size": "--lissa-batch-size",
}


def flag_words(message: str) -> str:
    """``"increase damping="`` -> ``"increase --damping"``; ``"scale=50"`` -> ``"--scale 50"``."""

    def sub(m):
        value = m.group(2).strip("'")
        return _FLAGS[m.group(1)] + (f" {value}" if value else "")

    return re.sub(r"\b(" + "|".join(_FLAGS) + r")=('[^']*'|[\w.+-]*)", sub, message)


def compute(cfg: InfluenceConfig, surrogate, *, progress: bool | None = None):
    """The scores of ``cfg.score`` for every user (order of ``sequential_train.txt``).

    Returns ``(scores, info)``; ``info`` has the parameter subset, per-stage seconds and, for
    ``influence``, the solver report (LiSSA: ``norm_trace``, ``steps_run``)."""
    from jaxrec.influence.params import ParamSubset

    if cfg.score == "representation":
        from jaxrec.train import user_representations

        t = time.perf_counter()
        reps = user_representations(surrogate, cfg.batch_size)
        return reps, {"params": "", "n_params": 0, "seconds": {"scores": time.perf_counter() - t}}
    sub = ParamSubset(surrogate.params, cfg.params)
    order, parts = width_strata(surrogate.data, surrogate.config.max_len)
    info = {"params": sub.pattern, "n_params": sub.size}
    s, extra = _score(cfg, surrogate, sub, parts, progress)
    info.update(extra)
    scores = np.empty(order.size, s.dtype)
    scores[order] = s
    return scores, info


def _score(cfg, surrogate, sub, parts, progress):
    """``(scores in strata order, info)`` of one score kind over the buckets ``parts``."""
    from jaxrec.influence.scores import el2n_scores, grand_scores, influence_scores
    from jaxrec.models import spec_of

    psl = sub.restrict(surrogate.per_sample_loss)
    t = time.perf_counter()
    if cfg.score == "influence":
        s, solver = influence_scores(
            sub.restrict(surrogate.loss),
            psl,
            sub.params,
            parts,
            solver=solver_options(cfg),
            damping=cfg.damping,
            convention=cfg.convention,
            scale=cfg.scale,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        seconds = solver.pop("seconds")
        seconds.pop("total", None)
        return s, {"seconds": seconds, "solver": solver}
    if cfg.score == "grand":
        s = grand_scores(psl, sub.params, parts, cfg.grand_batch_size, progress=progress)
    else:
        error = spec_of(surrogate.model).el2n_error(surrogate.model)
        s = el2n_scores(error, surrogate.params, parts, cfg.batch_size, progress=progress)
    return s, {"seconds": {"scores": time.perf_counter() - t}}


def check(cfg: InfluenceConfig) -> None:
    if not cfg.out.endswith(".npy"):
        raise UserError(f"--out {cfg.out!r}: a score file name must end in .npy")


def use_compile_cache(folder: str) -> None:
    """JAX's persistent compilation cache in ``folder`` (repeat runs skip XLA compiles)."""
    if not folder:
        return
    import jax

    path = os.path.expanduser(folder)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _solver_record(info: dict, out: Path) -> dict:
    """The solver report for the manifest; the LiSSA norm trace goes to ``OUT_trace.npy``."""
    solver = dict(info)
    trace = solver.pop("norm_trace", None)
    if trace is not None:
        trace_path = out.with_name(out.stem + "_trace.npy")
        atomic_write_bytes(
            trace_path, lambda f: np.save(f, np.asarray(trace, np.float32), allow_pickle=False)
        )
        solver["norm_trace_file"] = trace_path.name
        solver["final_norm"] = float(np.asarray(trace)[:, -1].mean())
    return {
        k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in solver.items()
    }


def main(cfg: InfluenceConfig) -> int:
    """Run ``dealrec influence`` and write ``cfg.out`` (+ manifest, + LiSSA trace)."""
    check(cfg)
    use_compile_cache(cfg.compile_cache)
    from jaxrec.train import load_surrogate

    t0 = time.perf_counter()
    try:
        surrogate = load_surrogate(cfg.run, cfg.data or None)
        load_s = time.perf_counter() - t0
        scores, info = compute(cfg, surrogate)
    except UserError as e:
        raise UserError(flag_words(str(e))) from None
    info["seconds"]["load"] = load_s
    out = Path(cfg.out)
    extra = {
        "run": str(cfg.run),
        "score": cfg.score,
        "param_filter": info["params"],
        "n_params": info["n_params"],
        "timing": {k: round(v, 3) for k, v in info["seconds"].items()},
    }
    if "solver" in info:
        extra["solver"] = _solver_record(info["solver"], out)
    options = {k: v for k, v in to_dict(cfg).items() if k not in ("run", "out")}
    save_scores(
        out,
        scores,
        kind=cfg.score,
        dataset=surrogate.dataset.fingerprint(),
        options=options,
        seconds=time.perf_counter() - t0,
        **extra,
    )
    steps = info.get("solver", {}).get("steps_run")
    print(
        f"{out}: {cfg.score} scores of {scores.shape[0]} users "
        f"({time.perf_counter() - t0:.1f} s; {info['n_params']} parameters"
        f"{f'; LiSSA steps {steps}' if steps else ''})"
    )
    return 0
