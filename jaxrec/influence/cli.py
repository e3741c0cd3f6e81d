"""``dealrec influence``: score every training user of a trained surrogate (any model).

``--score influence`` (default): :func:`jaxrec.influence.dealrec.dealrec_scores` (paper Eq.
11, Algorithm 1; the library function ``dealrec lds`` scores its ``dealrec`` row with too);
``--score grand``: per-sample gradient norm; ``--score el2n``: the model's EL2N
error (e.g. :func:`jaxrec.models.sasrec.el2n_error`); ``--score representation``: the surrogate's
user representation ``[n, hidden]`` (for TF-DCon / RecRanker).

GraNd and EL2N are computed on the **trained** surrogate by default (``--score-model
trained``): DEALRec's baselines share its surrogate. Paul et al. (2021) define them on models
early in training, averaged over initialisations: ``--score-model early`` trains
``--early-inits`` fresh surrogates (seeds ``seed, seed+1, ...``) for ``--early-epochs`` epochs
each (0 = at initialisation) with the trained surrogate's recipe and averages their scores
(:func:`early_params`; runs cached in ``RUN/early/``). Users are split into length
buckets (:func:`jaxrec.data.buckets.width_strata`). Writes ``OUT.npy`` + manifest (and
``OUT_trace.npy``, the LiSSA norm trace) atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxrec.config import InfluenceConfig
from jaxrec.config_io import flat_values
from jaxrec.data.buckets import width_strata
from jaxrec.data import load_dataset
from jaxrec.data.scorefiles import (
    atomic_write_bytes,
    merge_parts,
    part_folder,
    save_part,
    save_scores,
)
from jaxrec.base import Params
from jaxrec.errors import UserError

if TYPE_CHECKING:
    from jaxrec.train import Surrogate

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


def compute(
    cfg: InfluenceConfig, surrogate: Surrogate, *, progress: bool | None = None
) -> tuple[np.ndarray, dict]:
    """The scores of ``cfg.score`` for every user (order of ``sequential_train.txt``).

    Returns ``(scores, info)``; ``info`` has the parameter subset, per-stage seconds and, for
    ``influence``, the solver report (LiSSA: ``norm_trace``, ``steps_run``). ``influence`` is
    :func:`jaxrec.influence.dealrec.dealrec_scores` on the surrogate's losses and data."""
    from jaxrec.influence.dealrec import dealrec_scores
    from jaxrec.influence.params import ParamSubset
    from jaxrec.train import negative_draw

    if cfg.score == "representation":
        from jaxrec.train import user_representations

        t = time.perf_counter()
        reps = user_representations(surrogate, cfg.batch_size)
        return reps, {"params": "", "n_params": 0, "seconds": {"scores": time.perf_counter() - t}}
    if cfg.score == "influence":
        scores, info = dealrec_scores(
            surrogate.loss,
            surrogate.per_sample_loss,
            surrogate.sample_loss,
            surrogate.params,
            surrogate.data,
            cfg,
            draw=negative_draw(surrogate.config, surrogate.data, surrogate.dataset),
            progress=progress,
        )
        draws = info["solver"]["negative_draws"]
        info["solver"]["negative_seeds"] = draw_seeds(surrogate, draws, cfg.negative_seed)
        return scores, info
    sub = ParamSubset(surrogate.params, cfg.params)
    order, parts = width_strata(surrogate.data, surrogate.config.max_len)
    info = {"params": sub.pattern, "n_params": sub.size}
    s, extra = _score(cfg, surrogate, sub, parts, progress)
    info.update(extra)
    scores = np.empty(order.size, s.dtype)
    scores[order] = s
    return scores, info


def _score(cfg, surrogate, sub, parts, progress):
    """``(scores in strata order, info)`` of a baseline score (GraNd, EL2N) over the buckets
    ``parts``."""
    from jaxrec.influence.params import ParamSubset

    t = time.perf_counter()
    if cfg.score_model == "trained":
        s = _baseline_score(cfg, surrogate, sub, parts, progress)
        return s, {"seconds": {"scores": time.perf_counter() - t}}
    total, train_s = 0.0, 0.0
    seeds = [cfg.seed + k for k in range(cfg.early_inits)]
    for seed in seeds:
        t_train = time.perf_counter()
        params = early_params(surrogate, cfg.early_epochs, seed, Path(cfg.run) / "early")
        train_s += time.perf_counter() - t_train
        early = dataclasses.replace(surrogate, params=params)
        total = total + _baseline_score(
            cfg, early, ParamSubset(params, cfg.params), parts, progress
        )
    seconds = time.perf_counter() - t
    info = {"seconds": {"early_training": train_s, "scores": seconds - train_s}}
    info["early"] = {"epochs": cfg.early_epochs, "seeds": seeds}
    return total / len(seeds), info


def draw_seeds(surrogate: Surrogate, draws: int, offset: int = 0) -> list[int]:
    """The negative-sampling seeds of ``draws`` draws: ``surrogate seed + offset + k`` (each at
    epoch 0; :func:`jaxrec.train.negative_draw`). Draw 0 with ``offset=0`` is the surrogate's
    own fixed draw (``load_surrogate``'s ``data``)."""
    return [surrogate.config.seed + offset + k for k in range(draws)]


def _baseline_score(cfg, surrogate, sub, parts, progress):
    """GraNd or EL2N of ``surrogate``'s parameters (strata order)."""
    import jax

    from jaxrec.influence.scores import el2n_scores, grand_scores
    from jaxrec.models import spec_of

    if cfg.score == "grand":
        if sub.size == sum(np.size(x) for x in jax.tree.leaves(surrogate.params)):
            psl, params = surrogate.per_sample_loss, surrogate.params  # one compile per model
        else:
            psl, params = sub.restrict(surrogate.per_sample_loss), sub.params
        return grand_scores(psl, params, parts, cfg.grand_batch_size, progress=progress)
    error = spec_of(surrogate.model).el2n_error(surrogate.model)
    return el2n_scores(error, surrogate.params, parts, cfg.batch_size, progress=progress)


def early_params(surrogate: Surrogate, epochs: int, seed: int, cache: Path) -> Params:
    """Parameters of a fresh surrogate (initialisation ``seed``) after ``epochs`` epochs of the
    trained surrogate's own training recipe (``jaxrec.train.train`` with its config, on its
    dataset): the early-training models Paul et al. (2021) score GraNd / EL2N on.

    ``epochs == 0`` is the initialisation itself. Trained runs are kept in
    ``cache/seed{seed}_epochs{epochs}`` (``train``'s own checkpoint and resume), so a repeat
    call trains nothing. The scores are then taken on the trained surrogate's fixed data
    (its epoch-0 negatives), as for ``score_model="trained"``.
    """
    import jax

    from jaxrec.models import spec
    from jaxrec.train import restore_checkpoint, train

    if epochs == 0:
        return spec(surrogate.config.model).init_params(surrogate.model, jax.random.PRNGKey(seed))
    out = cache / f"seed{seed}_epochs{epochs}"
    cfg = dataclasses.replace(
        surrogate.config,
        data=str(surrogate.dataset.path),
        out=str(out),
        epochs=epochs,
        seed=seed,
        patience=epochs + 1,
        eval_every=epochs,
        resume=True,
    )
    done = out / "metrics.json"
    same = (out / "config.json").is_file() and json.loads(
        (out / "config.json").read_text()
    ) == dataclasses.asdict(cfg)
    if not (done.is_file() and same):
        train(cfg, progress=False)
    return restore_checkpoint(out / "checkpoints" / "best", surrogate.params)


def check(cfg: InfluenceConfig) -> None:
    if not cfg.out.endswith(".npy"):
        raise UserError(f"--out {cfg.out!r}: a score file name must end in .npy")
    if cfg.early_epochs < 0:
        raise UserError(f"--early-epochs must be >= 0, got {cfg.early_epochs}")
    if cfg.negative_draws < 1:
        raise UserError(f"--negative-draws must be >= 1, got {cfg.negative_draws}")
    if cfg.early_inits < 1:
        raise UserError(f"--early-inits must be >= 1, got {cfg.early_inits}")


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


# Where the stage ran, not what it computed: left out of the manifest's options.
_RUNTIME = ("run", "out", "coordinator", "num_processes", "process_id")


def main(cfg: InfluenceConfig) -> int:
    """Run ``dealrec influence`` and write ``cfg.out`` (+ manifest, + LiSSA trace).

    With ``cfg.coordinator`` every process runs this on its own rows
    (:func:`jaxrec.influence.hosts.row_range`), writes them as a part under ``OUT.shards/``,
    and process 0 merges the parts into ``OUT`` + manifest (:func:`merge_parts`)."""
    check(cfg)
    from jaxrec.influence import hosts

    hosts.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    multi = hosts.multi()
    if multi:
        check_hosts(cfg)
    use_compile_cache(cfg.compile_cache)
    from jaxrec.train import load_surrogate

    out = Path(cfg.out)
    t0 = time.perf_counter()
    try:
        rows = None
        if multi:
            rows = hosts.row_range(load_dataset(cfg.data or _run_data(cfg.run)).n_users)
            if jax_process() == 0:  # parts of an earlier, unfinished run
                shutil.rmtree(part_folder(out), ignore_errors=True)
            hosts.barrier("influence-start")
        surrogate = load_surrogate(cfg.run, cfg.data or None, rows)
        load_s = time.perf_counter() - t0
        scores, info = compute(cfg, surrogate)
    except UserError as e:
        raise UserError(flag_words(str(e))) from None
    info["seconds"]["load"] = load_s
    dataset = surrogate.dataset.fingerprint()
    if multi:
        assert rows is not None
        save_part(out, scores, rows, kind=cfg.score, dataset=dataset)
        hosts.barrier("influence-parts")
        if jax_process() != 0:
            print(f"process {jax_process()}: rows {rows[0]}..{rows[1] - 1} written")
            return 0
    _save(cfg, out, scores, info, dataset, multi, t0)
    return 0


def _save(
    cfg: InfluenceConfig, out: Path, scores, info: dict, dataset: dict, multi: bool, t0: float
) -> None:
    """Write ``out`` + manifest (under several processes: process 0 merges the parts)."""
    extra = {
        "run": str(cfg.run),
        "score": cfg.score,
        "param_filter": info["params"],
        "n_params": info["n_params"],
        "timing": {k: round(v, 3) for k, v in info["seconds"].items()},
    }
    if "solver" in info:
        extra["solver"] = _solver_record(info["solver"], out)
    if "early" in info:
        extra["early"] = info["early"]
    options = {k: v for k, v in flat_values(cfg).items() if k not in _RUNTIME}
    seconds = time.perf_counter() - t0
    if multi:
        extra["processes"] = jax_process_count()
        merge_parts(out, kind=cfg.score, dataset=dataset, options=options, seconds=seconds, **extra)
        n = dataset["n_users"]
    else:
        save_scores(
            out, scores, kind=cfg.score, dataset=dataset, options=options, seconds=seconds, **extra
        )
        n = scores.shape[0]
    steps = info.get("solver", {}).get("steps_run")
    print(
        f"{out}: {cfg.score} scores of {n} users "
        f"({time.perf_counter() - t0:.1f} s; {info['n_params']} parameters"
        f"{f'; LiSSA steps {steps}' if steps else ''})"
    )


def check_hosts(cfg: InfluenceConfig) -> None:
    """What runs on several processes: influence (LiSSA, CG, exact), GraNd and EL2N on the
    trained surrogate."""
    if cfg.score == "representation" or cfg.score_model == "early":
        raise UserError(
            "--coordinator: --score representation and --score-model early run in one process"
        )
    if cfg.score == "influence" and cfg.solver == "arnoldi":
        raise UserError(
            "--coordinator: --solver arnoldi runs in one process; use lissa, cg or exact"
        )


def _run_data(run: str) -> str:
    """The dataset folder recorded in the run ``run``."""
    from jaxrec.train import _read_run_config

    return _read_run_config(Path(run)).data


def jax_process() -> int:
    import jax

    return jax.process_index()


def jax_process_count() -> int:
    import jax

    return jax.process_count()
