"""``dealrec influence``: score every training user of a trained surrogate (any model).

``--score influence`` (default): :func:`jaxrec.influence.influence_scores` (paper Eq. 11,
Algorithm 1); ``--score grand``: per-sample gradient norm; ``--score el2n``: the model's EL2N
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
import functools
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from jaxrec.config import InfluenceConfig, LissaOptions, solver_options, to_dict
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
    from jaxrec.influence.params import ParamSubset
    from jaxrec.influence.scores import influence_scores

    t = time.perf_counter()
    if cfg.score == "influence":
        loss, psl = sub.restrict(surrogate.loss), sub.restrict(surrogate.per_sample_loss)
        options, batch_size = solver_options(cfg), cfg.batch_size
        draws = cfg.negative_draws if samples_negatives(surrogate) else 1
        if draws > 1 or cfg.negative_seed != 0:
            parts = negative_draw_parts(surrogate, parts, draws, cfg.negative_seed)
            loss, psl = draw_mean_losses(psl)
            options, batch_size = draw_batches(options, batch_size, draws)
        s, solver = influence_scores(
            loss,
            psl,
            sub.params,
            parts,
            solver=options,
            damping=cfg.damping,
            convention=cfg.convention,
            scale=cfg.scale,
            batch_size=batch_size,
            progress=progress,
        )
        seconds = solver.pop("seconds")
        seconds.pop("total", None)
        solver["negative_draws"] = draws
        solver["negative_seeds"] = draw_seeds(surrogate, draws, cfg.negative_seed)
        return s, {"seconds": seconds, "solver": solver}
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


def samples_negatives(surrogate) -> bool:
    """Whether the surrogate's loss reads sampled negatives (``ModelSpec.sampled_negatives``:
    SASRec, GRU4Rec, DCRec), the only thing ``--negative-draws`` redraws. BERT4Rec's has none
    (its cloze masks are one fixed draw), so it is scored with one draw."""
    from jaxrec.models import spec

    return spec(surrogate.config.model).sampled_negatives


def draw_seeds(surrogate, draws: int, offset: int = 0) -> list[int]:
    """The negative-sampling seeds of ``draws`` draws: ``surrogate seed + offset + k`` (each at
    epoch 0). Draw 0 with ``offset=0`` is the surrogate's own fixed draw
    (``load_surrogate``'s ``data``)."""
    return [surrogate.config.seed + offset + k for k in range(draws)]


def negative_draw_parts(surrogate, parts, draws: int, offset: int = 0) -> list[dict]:
    """``parts`` (the width buckets of ``surrogate.data``) with ``negatives`` replaced by
    ``[B, draws, w]``: the negatives of every draw of :func:`draw_seeds` (one per target
    position, drawn as training draws them under the surrogate's ``negatives`` option,
    ``jaxrec.train.training_data``), cut like ``parts``. The buckets depend on the
    targets only, so every draw cuts the same rows.

    Each draw's negatives are written into the ``[B, draws, w]`` arrays as it is made, so
    memory is the result plus one draw's training data (keeping every draw's buckets until a
    final stack held K copies of the inputs and targets too)."""
    from jaxrec.train import training_data

    out = [
        np.empty((p["negatives"].shape[0], draws, *p["negatives"].shape[1:]), p["negatives"].dtype)
        for p in parts
    ]
    for k, seed in enumerate(draw_seeds(surrogate, draws, offset)):
        data = training_data(surrogate.config, surrogate.data, surrogate.dataset, 0, seed)
        for g, part in enumerate(width_strata(data, surrogate.config.max_len)[1]):
            out[g][:, k] = part["negatives"]
        del data
    return [{**part, "negatives": neg} for part, neg in zip(parts, out)]


def draw_batches(options, batch_size: int, draws: int):
    """``(options, batch_size)`` for K-draw batches: the full-data batches (JVP scores, mean
    gradient, and the CG / exact / Arnoldi HVPs) hold ``batch_size // K`` users (at least 1),
    so a batch holds as many (user, draw) losses, and as much memory, as a one-draw batch of
    ``batch_size``. LiSSA's minibatch (16 users) is left as it is: its HVP sees all K draws of
    each of its users."""
    users = max(1, batch_size // draws)
    if not isinstance(options, LissaOptions):
        options = dataclasses.replace(options, batch_size=max(1, options.batch_size // draws))
    return options, users


@functools.lru_cache(maxsize=8)
def draw_mean_losses(per_sample_loss):
    """``(loss, per_sample_loss)`` averaged over negative draws: batches carry ``negatives``
    ``[B, K, w]`` and sample ``i``'s loss is ``(1/K) sum_k L_i(theta; negatives[:, k])``.

    The K-draw influence (``--negative-draws K``) is paper Eq. 11 for this averaged loss: the
    mean gradient, the Hessian (HVPs) and the per-sample gradients are all means over the K
    fixed draws. (It is not the mean of K single-draw influence scores: the inverse Hessian of
    a mean is not the mean of the inverses.) ``vmap`` over the draws leaves the sequence
    encoder, which does not depend on the negatives, unbatched: it runs once per batch. The
    same function object comes back for the same ``per_sample_loss`` (jit caches hit).
    """
    import jax
    import jax.numpy as jnp

    def mean_psl(params, batch):
        def one(neg):
            return per_sample_loss(params, {**batch, "negatives": neg})

        return jnp.mean(jax.vmap(one, in_axes=1)(batch["negatives"]), axis=0)

    def loss(params, batch):
        return jnp.mean(mean_psl(params, batch))

    return loss, mean_psl


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


def early_params(surrogate, epochs: int, seed: int, cache: Path):
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
    if "early" in info:
        extra["early"] = info["early"]
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
