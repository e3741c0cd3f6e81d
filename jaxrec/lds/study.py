"""The LDS study and the ``dealrec lds`` command: train the surrogate, attribute with every
estimator of ``cfg.attributions``, retrain on random subsets, score (see :mod:`jaxrec.lds`).

Everything lands in ``cfg.out``; retrained losses and attributions are cached there one
``.npy`` each (written atomically), so a killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxrec.config import LdsConfig, SurrogateConfig
from jaxrec.config_io import archived_names, flat_values, since_names
from jaxrec.data import Dataset, load_dataset
from jaxrec.data.buckets import width_strata
from jaxrec.data.scorefiles import atomic_write_bytes, write_json
from jaxrec.data.subset import write_user_subset
from jaxrec.errors import UserError
from jaxrec.influence.attribution import Checkpoints
from jaxrec.influence.batching import Strata
from jaxrec.influence.cli import use_compile_cache
from jaxrec.influence.exact import MAX_DIM
from jaxrec.influence.params import ParamSubset, resolve_pattern
from jaxrec.lds.estimators import (
    ATTRIBUTIONS,
    dealrec_attribution,
    estimator_attribution,
    estimator_options,
    influence_config,
)
from jaxrec.lds.report import bar_plot, markdown_table, summary
from jaxrec.lds.stats import draw_subsets, paired_difference, score, seed_agreement
from jaxrec.retrain import (
    SurrogateTask,
    model_module,
    retrain,
    surrogate_task,
    valid_losses,
)
from jaxrec.train import build_model, negative_draw


def retrained_losses(
    retrain_losses: Callable[[np.ndarray, int], np.ndarray],
    masks: np.ndarray,
    seeds: Iterable[int],
    cache: str | Path | None = None,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """``[M, len(seeds), v]``: ``retrain_losses(mask, seed) -> [v]`` (train on the subset
    ``mask`` with training seed ``seed``, return each validation user's loss) for every subset
    and seed.

    With ``cache`` (a folder), each result is written to ``cache/m{m:04d}_s{seed}.npy``
    atomically as soon as it is computed and read back instead of recomputed, so a killed run
    continues where it stopped. The cache is keyed by position only: the caller keeps one
    folder per setting (:func:`run` checks a fingerprint)."""
    seeds = list(seeds)
    folder = Path(cache) if cache else None
    out: list[list[Any]] = [[None] * len(seeds) for _ in range(len(masks))]
    todo = []
    for m in range(len(masks)):
        for k, s in enumerate(seeds):
            f = folder / f"m{m:04d}_s{s}.npy" if folder else None
            if f is not None and f.is_file():
                out[m][k] = np.load(f, allow_pickle=False)
            else:
                todo.append((m, k, s, f))
    total = len(masks) * len(seeds)
    disable = None if progress is None else not progress
    with tqdm(
        total=total, initial=total - len(todo), desc="retrain", unit="model", disable=disable
    ) as bar:
        for m, k, s, f in todo:
            value = np.asarray(retrain_losses(masks[m], s), np.float64)
            if not np.all(np.isfinite(value)):
                raise UserError(f"retrain on subset {m} (seed {s}) gave a non-finite loss")
            if f is not None:
                atomic_write_bytes(f, functools.partial(_save_npy, value=value))
            out[m][k] = value
            bar.update(1)
    return np.stack([np.stack(row) for row in out])


def _save_npy(fh: BinaryIO, value: np.ndarray) -> None:
    np.save(fh, value, allow_pickle=False)


def surrogate_config(cfg: LdsConfig, data: str) -> SurrogateConfig:
    """The surrogate recipe of an LDS run: ``SurrogateConfig`` defaults with ``cfg``'s model,
    epochs, dropout, lr, batch size and seed. A model other than ``sasrec`` needs a
    ``SurrogateConfig.model`` field that accepts it."""
    values: dict[str, Any] = dict(
        data=data,
        epochs=cfg.epochs,
        dropout=cfg.dropout,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    names = {f.name for f in dataclasses.fields(SurrogateConfig)}
    if "model" in names:
        choices = typing.get_args(typing.get_type_hints(SurrogateConfig)["model"])
        if choices and cfg.model not in choices:
            raise UserError(f"model={cfg.model!r}: expected one of {', '.join(choices)}")
        values["model"] = cfg.model
    elif cfg.model != "sasrec":
        raise UserError(f"model={cfg.model!r}: this build has the sasrec surrogate only")
    return dataclasses.replace(SurrogateConfig(), **values)


# Fields that change retrained losses or attributions; the others (subsets, seeds,
# attributions, bootstrap) may change between runs on one folder: masks and seeds are drawn as
# prefixes, and attributions are cached one file each.
_SCORING_ONLY = {"out", "subsets", "seeds", "attributions", "bootstrap", "level", "compile_cache"}
# Fields only the dealrec row reads: keyed in its file name (_dealrec_tag), not the folder's.
_DEALREC_ONLY = {"negative_draws", "sample_loss"}
_RETRAIN_KEYS = {"data", "users", "alpha", "epochs", "dropout", "lr", "batch_size", "seed", "model"}


def settings(cfg: LdsConfig) -> dict:
    """``cfg`` as its folder records it: flat (the nested solver options under their flat
    names, :func:`jaxrec.config_io.flat_values`), a renamed option under its archived name
    (its first alias), an option added since (``since``) left out at its default, so the
    folders and caches of earlier runs stay valid."""
    out = {}
    defaults = flat_values(LdsConfig())
    since = since_names(LdsConfig)
    archived = archived_names(LdsConfig)
    for name, value in flat_values(cfg).items():
        if name in since and value == defaults[name]:
            continue
        out[archived.get(name, name)] = value
    return out


def _fingerprint(cfg: LdsConfig, keys: Iterable[str]) -> str:
    """A hash of the options ``keys`` (flat or archived names) as :func:`settings` records
    them."""
    archived = archived_names(LdsConfig)
    names = {archived.get(k, k) for k in keys}
    d = {k: v for k, v in settings(cfg).items() if k in names}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _key_names(cfg: LdsConfig, drop: set) -> set:
    """Every option name :func:`settings` records, but ``drop``."""
    archived = archived_names(LdsConfig)
    return {archived.get(k, k) for k in flat_values(cfg)} - drop


def _dealrec_tag(cfg: LdsConfig) -> str:
    """The suffix of the dealrec row's cache file: its own options (and the score's version:
    since issue 23 it is :func:`jaxrec.influence.dealrec.dealrec_scores`, so a file of the
    earlier one-draw, training-loss score is never reused)."""
    return "v2_" + _fingerprint(cfg, _DEALREC_ONLY)[:8]


def _check_folder(out: Path, cfg: LdsConfig) -> None:
    """Refuse to mix runs: ``out/settings.json`` must match ``cfg`` (except scoring-only
    fields). Writes it on a fresh folder."""
    keep = {k: v for k, v in settings(cfg).items() if k not in _SCORING_ONLY | _DEALREC_ONLY}
    f = out / "settings.json"
    if f.is_file():
        old = json.loads(f.read_text())
        diff = sorted(k for k in set(old) | set(keep) if old.get(k) != keep.get(k))
        if diff:
            raise UserError(
                f"{out} holds an LDS run with other settings ({diff[0]}={old.get(diff[0])!r}, "
                f"now {keep.get(diff[0])!r}); use another out="
            )
    else:
        write_json(f, keep)


def check_options(cfg: LdsConfig) -> None:
    """Every check of ``cfg`` that needs no data: attribution names, counts, fractions and the
    parameter regex. Raises :class:`UserError` naming the options and their values."""
    unknown = [a for a in cfg.attributions if a not in ATTRIBUTIONS]
    if unknown:
        raise UserError(
            f"unknown attribution {unknown[0]!r} in attributions=; expected "
            + ", ".join(ATTRIBUTIONS)
        )
    if not cfg.attributions or len(set(cfg.attributions)) != len(cfg.attributions):
        raise UserError(f"attributions= must name distinct attributions, got {cfg.attributions}")
    flat = flat_values(cfg)  # the nested options by their flat names (trak_dim)
    small = {
        k: flat[k] for k in ("seeds", "val_users", "epochs", "bootstrap", "batch_size", "trak_dim")
    }
    bad = {k: v for k, v in small.items() if v < 1}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UserError(f"{shown}: must be >= 1")
    if cfg.users < 0:
        raise UserError(f"users={cfg.users}: must be >= 0 (0 = every user)")
    if not 0 < cfg.alpha < 1:
        raise UserError(f"alpha={cfg.alpha}: the subset fraction must be in (0, 1)")
    if cfg.subsets < 2:
        raise UserError(f"subsets={cfg.subsets}: LDS needs at least 2 subsets")
    if not 0 < cfg.level < 1:
        raise UserError(f"level={cfg.level}: the confidence level must be in (0, 1)")
    for name in ("damping", "small_damping", "scale", "lr", "kfac_damping_scale"):
        if not flat[name] > 0:
            raise UserError(f"{name}={flat[name]}: must be > 0")
    try:
        re.compile(resolve_pattern(cfg.params))
    except re.error as e:
        raise UserError(f"params={cfg.params!r} is not a valid regex ({e})") from None


def check_parameters(cfg: LdsConfig, ds: Dataset) -> int:
    """The size of the block ``cfg.params`` selects in ``cfg.model`` on dataset ``ds``, from the
    parameter shapes alone (nothing is trained). Raises :class:`UserError` when it selects
    nothing, or more than the exact solve takes while ``exact`` is among the attributions."""
    scfg = surrogate_config(cfg, str(ds.path))
    _module, model_spec = model_module(scfg)
    model = build_model(scfg, ds.n_items, ds)
    shapes = jax.eval_shape(lambda: model_spec.init_params(model, jax.random.PRNGKey(0)))
    try:
        size = ParamSubset(shapes, cfg.params).size
    except UserError as e:
        raise UserError(f"params={cfg.params!r}: {e}") from None
    if "exact" in cfg.attributions and size > MAX_DIM:
        raise UserError(
            f"params={cfg.params!r} selects {size:,} values; the exact attribution takes at "
            f"most {MAX_DIM:,}: choose a smaller block with params= or drop exact from "
            "attributions="
        )
    return size


def _cached(path: Path, compute: Callable[[], tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    """``compute()``'s ``(array, info)``, or the copy saved at ``path`` (``.npy``, its info in
    the ``.json`` beside it; an earlier run's file without one reads ``{}``)."""
    info_file = path.with_suffix(".json")
    if path.is_file():
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        return np.load(path, allow_pickle=False), info
    value, info = compute()
    value = np.asarray(value)
    atomic_write_bytes(path, lambda fh: np.save(fh, value, allow_pickle=False))
    write_json(info_file, info)
    return value, info


class _Engine:
    """The full model and the engine's inputs, built once, when an attribution is missing:
    the surrogate trained on every user (with its per-epoch checkpoints for TracIn-CP), the
    parameter block, the strata of the training users and the chosen validation rows."""

    def __init__(self, cfg: LdsConfig, task: SurrogateTask, chosen: np.ndarray, meta: Path):
        t = time.perf_counter()
        epochs: list = []
        n = len(task.arrays["targets"])
        # host copies: the training step donates the parameters' device buffers
        self.params = retrain(
            task, np.ones(n, bool), 0, on_epoch=lambda e, p: epochs.append(jax.device_get(p))
        )
        self.train_seconds = time.perf_counter() - t
        self.sub = ParamSubset(self.params, cfg.params)
        self.loss = self.sub.restrict(task.loss)
        self.psl = self.sub.restrict(task.per_sample_loss)
        order, parts = width_strata(task.train_data, task.cfg.max_len)
        self.strata = Strata(parts, order)
        valid = {k: np.asarray(v)[chosen] for k, v in task.valid.items() if k != "index"}
        self.valid = valid
        # TracIn-CP: the checkpoints' full trees, differentiated in the block only
        self.checkpoints = Checkpoints(tuple(epochs), (cfg.lr,) * len(epochs))
        self.frozen = (self.sub.frozen(task.loss), self.sub.frozen(task.per_sample_loss))
        write_json(meta, {"n_params": self.sub.size, "paths": self.sub.paths})

    def attribution(self, name: str, cfg: LdsConfig, progress) -> tuple[np.ndarray, dict]:
        options = estimator_options(name, cfg)
        if name == "tracin":
            return estimator_attribution(
                options,
                *self.frozen,
                self.checkpoints,
                self.strata,
                self.valid,
                progress=progress,
            )
        return estimator_attribution(
            options,
            self.loss,
            self.psl,
            self.sub.params,
            self.strata,
            self.valid,
            progress=progress,
        )


def attributions(
    cfg: LdsConfig,
    task: SurrogateTask,
    chosen: np.ndarray,
    out: Path,
    *,
    progress: bool | None = None,
) -> tuple[dict, dict, dict]:
    """Every attribution of ``cfg.attributions`` (``[n, v]`` in user order), cached under
    ``out/attributions``: ``(arrays, info, timing)``; ``info[name]`` holds the estimator's
    seconds and peak memory (:func:`jaxrec.influence.attribution.measured`), ``timing`` the
    full model's training seconds when it was trained here."""
    fp = _fingerprint(cfg, _key_names(cfg, _SCORING_ONLY | _DEALREC_ONLY))
    meta = out / "attributions" / f"meta_{fp}.json"
    engine: list[_Engine] = []

    def setup() -> _Engine:
        if not engine:
            engine.append(_Engine(cfg, task, chosen, meta))
        return engine[0]

    arrays, info = {}, {}
    for name in cfg.attributions:

        def compute(name: str = name) -> tuple[np.ndarray, dict]:
            e = setup()
            if name == "dealrec":  # the influence stage's score: library call, user order
                return dealrec_attribution(
                    task.loss,
                    task.per_sample_loss,
                    task.sample_loss,
                    e.params,
                    task.train_data,
                    len(chosen),
                    influence_config(cfg),
                    draw=negative_draw(task.cfg, task.train_data, task.dataset),
                    progress=progress,
                )
            return e.attribution(name, cfg, progress)

        tag = f"{fp}_{_dealrec_tag(cfg)}" if name == "dealrec" else fp
        arrays[name], info[name] = _cached(out / "attributions" / f"{name}_{tag}.npy", compute)
    n_params = json.loads(meta.read_text())["n_params"] if meta.is_file() else setup().sub.size
    timing = {"train_full": engine[0].train_seconds} if engine else {}
    return arrays, info, {**timing, "n_params": n_params}


def _validation_users(cfg: LdsConfig, n_valid: int) -> np.ndarray:
    """The seeded choice of at most ``cfg.val_users`` validation rows (sorted)."""
    rng = np.random.default_rng(cfg.seed + 200)
    return np.sort(rng.choice(n_valid, min(cfg.val_users, n_valid), replace=False))


def _dataset(cfg: LdsConfig, out: Path):
    """The data set of the study: ``cfg.data``, or its seeded slice of ``cfg.users`` users
    (written once under ``out/data``). Checks every option first, so nothing is written for
    a bad one."""
    check_options(cfg)
    full = load_dataset(cfg.data)
    check_parameters(cfg, full)  # all checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, cfg)
    if not cfg.users or cfg.users >= full.n_users:
        return full
    sliced = out / "data"
    if not (sliced / "sequential_train.txt").is_file():
        write_user_subset(full, sliced, n_users=cfg.users, seed=cfg.seed)
    return load_dataset(sliced)


def _retrain(cfg: LdsConfig, task: SurrogateTask, chosen, masks, out: Path, progress) -> tuple:
    """``(losses [M, seeds, v], timing)``: every subset x seed retrain, cached."""
    seconds: list[float] = []

    def losses_of(mask: np.ndarray, seed: int) -> np.ndarray:
        t = time.perf_counter()
        value = valid_losses(task, retrain(task, mask, seed))[chosen]
        seconds.append(time.perf_counter() - t)
        return value

    t = time.perf_counter()
    cache = out / "retrained" / _fingerprint(cfg, _RETRAIN_KEYS | {"val_users"})
    losses = retrained_losses(losses_of, masks, range(cfg.seeds), cache, progress=progress)
    timing = {"retrain": time.perf_counter() - t}
    if seconds:
        timing["seconds_per_retrain"] = float(np.mean(seconds))
    return losses, timing


def _scores(cfg: LdsConfig, arrays: dict, masks: np.ndarray, losses: np.ndarray) -> dict:
    """:func:`jaxrec.lds.stats.score` of every attribution, with the paired difference to
    ``exact`` where it ran."""
    kw: dict[str, Any] = dict(resamples=cfg.bootstrap, level=cfg.level, seed=cfg.seed)
    scores = score(arrays, masks, losses, **kw)
    if "exact" in arrays:
        for k in scores:
            scores[k]["minus_exact"] = paired_difference(
                scores[k]["per_user"], scores["exact"]["per_user"], **kw
            )
    return scores


def _costs(info: dict) -> dict:
    """Each estimator's seconds (fit, scoring, total) and memory (bytes) from its info
    (:func:`jaxrec.influence.attribution.measured`): the process-wide high-water marks (host
    RSS, device where reported), and where sampled the estimator's own peak host RSS
    (``host_block_peak_rss_bytes``) and how much it added to the RSS it started from
    (``host_added_rss_bytes``)."""
    out = {}
    for name, i in info.items():
        seconds = {k: round(v, 2) for k, v in i.get("seconds", {}).items()}
        peaks = list(i.get("memory", {}).values())
        blocks = [p for p in peaks if p.get("host_block_peak_rss_bytes") is not None]
        out[name] = {
            "seconds": seconds,
            "host_peak_rss_bytes": max((p["host_peak_rss_bytes"] for p in peaks), default=None),
            "device_peak_bytes": max((p["device_peak_bytes"] or 0 for p in peaks), default=None)
            or None,
        }
        if blocks:
            out[name]["host_block_peak_rss_bytes"] = max(
                p["host_block_peak_rss_bytes"] for p in blocks
            )
            out[name]["host_added_rss_bytes"] = max(
                p["host_block_peak_rss_bytes"] - p["host_start_rss_bytes"] for p in blocks
            )
    return out


def run(cfg: LdsConfig, *, progress: bool | None = None) -> dict:
    """An LDS study on one dataset slice: train the surrogate on all users, compute every
    attribution of ``cfg.attributions`` for up to ``cfg.val_users`` validation users, retrain
    on ``cfg.subsets`` random ``cfg.alpha`` subsets x ``cfg.seeds`` training seeds, and score.
    Everything lands in ``cfg.out`` (``results.json``, ``results.md``, ``lds.png``), with the
    retrained losses and attributions cached there as ``.npy`` so a killed run continues.
    Returns the results dict."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    ds = _dataset(cfg, out)
    task = surrogate_task(surrogate_config(cfg, str(ds.path)), ds)
    masks = draw_subsets(ds.n_users, cfg.subsets, cfg.alpha, cfg.seed + 100)
    n_valid = len(task.valid["inputs"])
    chosen = _validation_users(cfg, n_valid)
    arrays, info, timing = attributions(cfg, task, chosen, out, progress=progress)
    n_params = timing.pop("n_params")
    timing.update(
        {f"attribution_{k}": v.get("seconds", {}).get("total", 0.0) for k, v in info.items()}
    )
    losses, retrain_timing = _retrain(cfg, task, chosen, masks, out, progress)
    scores = _scores(cfg, arrays, masks, losses)
    ref = arrays.get("exact")
    results = {
        "protocol": "LDS (Ilyas et al. 2022; Park et al. 2023): Spearman over subsets per "
        "validation user, mean over users, percentile bootstrap CI over validation users",
        "data": cfg.data,
        "users": ds.n_users,
        "valid_users": int(n_valid),
        "scored_valid_users": int(len(chosen)),
        "subsets": cfg.subsets,
        "alpha": cfg.alpha,
        "seeds": cfg.seeds,
        "epochs": cfg.epochs,
        "model": cfg.model,
        "params": cfg.params,
        "n_params": n_params,
        "seed_agreement": seed_agreement(losses),
        "lds": {k: summary(v, arrays[k], ref) for k, v in scores.items()},
        "per_user": {k: v["per_user"] for k, v in scores.items()},
        "costs": _costs(info),
        "config": flat_values(cfg),
        "seconds": {
            k: round(v, 1)
            for k, v in {**timing, **retrain_timing, "total": time.perf_counter() - t0}.items()
        },
    }
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results))
    bar_plot(results, out / "lds.png")
    return results


def main(cfg: LdsConfig) -> int:
    """``dealrec lds``: :func:`run`, then print the table."""
    use_compile_cache(cfg.compile_cache)
    results = run(cfg)  # the command line names the flags of its errors (jaxrec.cli)
    print(markdown_table(results), end="")
    print(f"{cfg.out}: results.json, results.md, lds.png ({results['seconds']['total']:.0f} s)")
    return 0
