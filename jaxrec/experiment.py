"""``dealrec experiment CONFIG``: selection methods x seeds (x a grid of swept options) through
fine-tune and evaluation, with a results table, significance tests and a plot.

The config file is a pipeline config (:mod:`jaxrec.pipeline`) plus an ``experiment:`` section
(:class:`ExperimentConfig`). The shared stages (surrogate, influence, semantic IDs, effort) run
once; then every *cell* (method, seed, grid point) runs select -> finetune -> evaluate in
``workdir/runs/CELL/`` (:func:`run_folder`: a grid point at the config's own value is the
un-swept run, so every study of one workdir shares it). A finished cell is reused, so an
interrupted experiment continues where it stopped, and ``--methods`` / ``--seeds`` run a part
of it now and the rest later; the tables always cover every finished cell of the config. With
``experiment.archive`` a finished cell also lives outside the workdir (:mod:`jaxrec.archive`,
small enough to commit), and a cell archived there is not rerun after its workdir is gone. The
evaluation users are the same for every run (``evaluate.seed`` is not varied), so runs are
paired.

Two tests against the baseline method (``experiment.baseline``, ``random`` by default; the
paper's Fig. 4 compares its ablations with ``dealrec``), at the same grid point:

* over seeds: a paired t-test of the run means (pairs = seeds; needs >= 2 seeds);
* over users: every user's metric averaged over the seeds both methods ran, then a paired
  t-test and a Wilcoxon signed-rank test over the evaluated users (pairs = users).

Outputs in ``workdir``: ``results.md``, ``results.csv`` (one row per method and grid point:
mean and std over seeds, seconds per stage), ``runs.csv`` (one row per run), ``ttest.csv``
(over seeds), ``usertest.csv`` (over users) and ``results.png``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from jaxrec.archive import RunArchive
from jaxrec.config import help_of, make_config, option
from jaxrec.data import write_json
from jaxrec.data.ranking import per_user_recall_ndcg
from jaxrec.errors import UserError
from jaxrec.pipeline import (
    PipelineArgs,
    PipelineConfig,
    add_score_stages,
    baseline_score_options,
    config_classes,
    digest,
    key_options,
    prepare_workdir,
    read_experiment_file,
    resolved_options,
    run_stages,
    stage_keys,
    stage_output,
    stages_finished,
    uses_llm_reps,
    wire,
    wire_llm_reps,
)
from jaxrec.select import REQUIRES, check_method

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
SHARED = ("surrogate", "influence", "semantic_ids", "effort", "user_reps")
PER_RUN = ("select", "finetune", "evaluate")
# methods that need the effort score file
# the shared stages that a selection input comes from (jaxrec.select.REQUIRES names the inputs)
INPUT_STAGES = {
    "influence": ("surrogate", "influence"),
    "effort": ("effort",),
    "grand": ("surrogate",),
    "el2n": ("surrogate",),
    "representations": ("surrogate",),
    "interactions": (),
}


def shared_reads(pipe: PipelineConfig, method: str, llm_reps: bool) -> list[str]:
    """The shared stages a run of ``method`` reads, in pipeline order: those of its selection
    inputs, ``user_reps`` when its selection reads the LLM's (``llm_reps``), and
    ``semantic_ids`` (the TIGER backend's fine-tune and evaluation; :meth:`active` drops it for
    BIGRec). Only these enter the run's reuse key, so a random run does not depend on the
    influence options."""
    wanted = {"semantic_ids", *(s for i in REQUIRES[method] for s in INPUT_STAGES[i])}
    if llm_reps:
        wanted.add("user_reps")
    return pipe.active(sorted(wanted))


@dataclass
class ExperimentConfig:
    """The ``experiment:`` section of a config file."""

    methods: list[str] = option(
        ["random", "dealrec"], "selection methods to compare (select --method values)"
    )
    seeds: list[int] = option([0], "seeds of every method's select and finetune runs")
    # e.g. {"select.n": [128, 256], "select.lamda": [0.1, 0.3]}
    sweep: dict = option(
        {},
        "grid over per-run options (select / finetune / evaluate keys), crossed with methods "
        "and seeds",
    )
    # the evaluated users split into this many equal groups by their test loss under the
    # `reference` method's run (same seed and grid point), easiest (lowest loss) first
    user_groups: int = option(
        0, "> 0: also report every metric per user group (paper Fig. 6); 0 = off"
    )
    baseline: str = option(
        "",
        "the method every other one is tested against (paired over seeds and over users); "
        "empty = random when it is one of the methods, else no tests; the paper's Fig. 4 "
        "compares the ablations with dealrec",
    )
    reference: str = option("random", "user_groups: the method whose test losses group the users")
    # "same": the paper's Fig. 6, so the reference run is graded on its own groups, which
    # favours it in the easy group; "next": the reference run of the next seed of `seeds`,
    # cyclic: a model neither compared run is
    reference_seed: Literal["same", "next"] = option(
        "same",
        "user_groups: which seed's reference run groups a run: same (the paper's) or next "
        "(the next seed, cyclic)",
    )
    # several studies then share one workdir: its shared stages and any run with the same options
    name: str = option(
        "", "empty = tables and figures in the workdir; NAME = in workdir/studies/NAME"
    )
    # runs/ may not outlive the machine; the archive (small: metrics and per-user arrays) can
    # be committed, and a run found there with the same options is not run again
    archive: str = option(
        "",
        "folder kept outside the workdir (e.g. committed) with every finished run's metrics "
        "and per-user arrays (jaxrec.archive); a run archived there is not rerun, and each "
        "run that finishes is added; empty = off",
    )


@dataclass
class ExperimentArgs(PipelineArgs):
    """Command line of ``dealrec experiment``: a config file, plus overrides."""

    methods: list[str] = option([], "run only these methods of the config now (the rest later)")
    seeds: list[int] = option([], "run only these seeds of the config now (the rest later)")
    points: list[str] = option(
        [],
        "run only the grid points with these swept values (section.key=value) now, as "
        "'select.n=512 select.n=2048' (the rest later)",
    )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        PipelineArgs.add_arguments(parser)
        parser.add_argument(
            "--methods",
            nargs="+",
            default=[],
            help=help_of(ExperimentArgs, "methods"),
        )
        parser.add_argument(
            "--seeds",
            nargs="+",
            type=int,
            default=[],
            help=help_of(ExperimentArgs, "seeds"),
        )
        parser.add_argument(
            "--points",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help=help_of(ExperimentArgs, "points"),
        )

    @classmethod
    def from_args(cls, args):
        return cls(
            config=args.config,
            workdir=args.workdir,
            stages=list(args.stages),
            methods=list(args.methods),
            seeds=list(args.seeds),
            points=list(args.points),
        )


@dataclass(frozen=True)
class Cell:
    """One run of the experiment: a method, a seed and a point of the sweep grid."""

    method: str
    seed: int
    point: tuple = ()  # ((key, value), ...) in the order of the sweep

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}" + "".join(f"-{k}={v}" for k, v in self.point)


# ----------------------------------------------------------------------------- the grid
def check_sweep(sweep: dict, sections: dict, source: str) -> list[tuple]:
    """Check the swept keys and values (before any stage runs); return the grid points.

    Args:
      sweep: ``{"section.key": [values]}``; sections are the per-run stages.
      sections: the config file's stage sections (the values are checked against their types).
      source: names the config in errors.
    Returns:
      every point of the grid, as ``((key, value), ...)`` tuples.
    """
    if not isinstance(sweep, dict):
        raise UserError(f"{source}: sweep must be a mapping of 'section.key' to a list of values")
    classes = config_classes()
    for key, values in sweep.items():
        section, _, name = str(key).partition(".")
        if section not in PER_RUN or not name:
            raise UserError(
                f"{source}: cannot sweep {key!r}: sweep keys are "
                f"{' / '.join(PER_RUN)} options, as 'select.n'"
            )
        if not isinstance(values, list) or not values:
            raise UserError(f"{source}: sweep {key!r} needs a non-empty list of values")
        for value in values:
            make_config(
                classes[section],
                {**(sections.get(section) or {}), name: value},
                f"{source} sweep {key}",
            )
    keys = list(sweep)
    return [tuple(zip(keys, combo)) for combo in itertools.product(*sweep.values())]


def experiment_cells(exp: ExperimentConfig, points: list[tuple]) -> list[Cell]:
    return [Cell(m, s, p) for p in points for m in exp.methods for s in exp.seeds]


def run_folder(cell: Cell, wired: dict) -> str:
    """The name of ``cell``'s run folder: :attr:`Cell.name` without the swept keys whose value is
    the config's own (``wired``), so a grid point equal to the base config is the same run as
    the un-swept cell and runs once (``lamda=0.3`` of the lamda sweep is Table 2's DEALRec run
    when the config's lamda is 0.3).

    Args:
      cell: the run.
      wired: the per-run stages' resolved options before the cell's point is applied.
    Returns:
      the folder name under ``workdir/runs``.
    """

    def base(key: str):
        section, _, name = key.partition(".")
        return resolved_options(section, wired[section])[name]

    point = tuple((k, v) for k, v in cell.point if base(k) != v)
    return Cell(cell.method, cell.seed, point).name


def wire_cell(wired: dict, workdir: Path, cell: Cell, llm_reps: bool = False) -> tuple[Path, dict]:
    """The run folder of ``cell`` (:func:`run_folder`) and its per-run stages' resolved options
    (``llm_reps``: its selection reads the ``user_reps`` stage's file, see
    :func:`jaxrec.pipeline.uses_llm_reps`)."""
    d = workdir / "runs" / run_folder(cell, wired)
    w = {k: dict(v) for k, v in wired.items()}
    for key, value in cell.point:
        section, _, name = key.partition(".")
        w[section][name] = value
    w["select"].update(method=cell.method, seed=cell.seed, out=str(d / "selected.npy"))
    wire_llm_reps(w["select"], w, llm_reps)
    w["finetune"].update(seed=cell.seed, selection=str(d / "selected.npy"), out=str(d / "adapter"))
    w["evaluate"].update(adapter=str(d / "adapter"), out=str(d / "metrics.json"))
    return d, w


# ----------------------------------------------------------------------------- results
def per_user_metrics(predictions: Path, ks=(10, 20)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every evaluated user's Recall/NDCG@K from an evaluation's ``predictions.jsonl``.

    Returns:
      ``(rows [n_users], {"recall@K": [n_users], ...})`` in the file's order.
    """
    rows, hits, n_truth = [], [], []
    with open(predictions, encoding="utf-8") as f:
        for line in f:
            p = json.loads(line)
            truth = set(p["truth"])
            top = [int(i) in truth for i in p["top"][: max(ks)]]
            rows.append(int(p["row"]))
            hits.append(top + [False] * (max(ks) - len(top)))
            n_truth.append(len(truth))
    return np.asarray(rows), per_user_recall_ndcg(np.asarray(hits), np.asarray(n_truth), ks)


def per_user_losses(predictions: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, loss)`` of every evaluated user: the fine-tuned model's loss of the user's test
    target, as the evaluation recorded it (field ``loss`` of ``predictions.jsonl``)."""
    rows, losses = [], []
    with open(predictions, encoding="utf-8") as f:
        for line in f:
            p = json.loads(line)
            if "loss" not in p:
                raise UserError(
                    f"{predictions}: no per-user 'loss'; user groups need an "
                    "evaluation that records it"
                )
            rows.append(int(p["row"]))
            losses.append(float(p["loss"]))
    return np.asarray(rows), np.asarray(losses)


def loss_groups(losses: np.ndarray, n_groups: int = 3) -> np.ndarray:
    """The group of each user, 0 (lowest loss: easiest) .. ``n_groups - 1`` (hardest): equal
    sizes (differing by at most one user), ties kept in input order (paper Fig. 6)."""
    order = np.argsort(np.asarray(losses), kind="stable")
    groups = np.empty(len(order), dtype=np.int64)
    for g, part in enumerate(np.array_split(order, n_groups)):
        groups[part] = g
    return groups


def group_rows(
    rows: list[dict],
    keys: list[str],
    reference: str,
    n_groups: int,
    reference_seed: Literal["same", "next"] = "same",
    seeds: list[int] = (),
) -> list[dict]:
    """Every run's metrics within each user group (paper Fig. 6) of a ``reference`` run at the
    same grid point (a run without its reference is left out).

    Args:
      rows: the finished runs (``method``, ``seed``, ``predictions``, the swept ``keys``).
      keys: the swept keys.
      reference: the method whose run's per-user test losses define the groups.
      n_groups: equal-sized groups, by :func:`loss_groups`.
      reference_seed: ``"same"``: the reference run of the run's own seed (the paper's rule);
        ``"next"``: of the next seed of ``seeds`` (cyclic), so no run is graded on the groups
        of its own model.
      seeds: the experiment's seeds, in order (for ``"next"``).
    Returns:
      rows with a ``group`` column (1 = easiest) and the metrics within that group.
    """
    if reference_seed == "next" and len(seeds) < 2:
        raise UserError("reference_seed 'next' needs at least 2 seeds")
    following = {s: seeds[(i + 1) % len(seeds)] for i, s in enumerate(seeds)}
    index = {(tuple(r[k] for k in keys), r["method"], r["seed"]): r for r in rows}
    out = []
    for r in rows:
        point = tuple(r[k] for k in keys)
        seed = following[r["seed"]] if reference_seed == "next" else r["seed"]
        ref = index.get((point, reference, seed))
        if ref is None:
            continue
        ref_users, ref_loss = run_user_losses(ref)
        where = {int(u): g for u, g in zip(ref_users, loss_groups(ref_loss, n_groups))}
        users, metrics = run_user_metrics(r)
        group = np.array([where[int(u)] for u in users])
        for g in range(n_groups):
            mask = group == g
            out.append(
                {
                    **dict(zip(keys, point)),
                    "group": g + 1,
                    "method": r["method"],
                    "seed": r["seed"],
                    **{k: float(metrics[k][mask].mean()) for k in METRICS},
                    "n_users": int(mask.sum()),
                    **{f"{s}_seconds": r[f"{s}_seconds"] for s in PER_RUN},
                }
            )
    return out


def cell_row(cell: Cell, d: Path, seconds: dict, key: str = "", record: Path | None = None) -> dict:
    """The results row of the finished run of ``cell`` in folder ``d``; ``key``: its reuse
    key (what an archive finds it by); ``record``: its fine-tune's ``train_record.json``, which
    gives the row's ``finetune_epochs`` and ``finetune_best_epoch`` (so an archive keeps them
    when the workdir is gone)."""
    metrics = json.loads((d / "metrics.json").read_text())
    flat = metrics.get("metrics", metrics)
    record = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    return {
        **dict(cell.point),
        "method": cell.method,
        "seed": cell.seed,
        **{k: float(flat[k]) for k in METRICS},
        "n_users": int(flat.get("n_users", 0)),
        **{f"{s}_seconds": float(seconds.get(s, 0.0)) for s in PER_RUN},
        "finetune_epochs": len(record.get("epochs") or []),
        "finetune_best_epoch": int(record.get("best_epoch") or 0),
        "predictions": str(d / "metrics.predictions.jsonl"),
        "key": key,
    }


def run_user_metrics(row: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(users, {metric: [n_users]})`` of a results row: from its run's predictions, or from
    the archive it was restored from (``_per_user``, :class:`jaxrec.archive.RunArchive`)."""
    if "_per_user" in row:
        users, metrics, _ = row["_per_user"]
        return users, metrics
    return per_user_metrics(Path(row["predictions"]))


def run_user_losses(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(users, loss)`` of a results row (see :func:`run_user_metrics`)."""
    if "_per_user" in row:
        users, _, loss = row["_per_user"]
        if loss is None:
            raise UserError(f"archived run {row['key']}: no per-user 'loss'")
        return users, loss
    return per_user_losses(Path(row["predictions"]))


def _groups(rows: list[dict], keys: list[str]) -> dict[tuple, dict[str, list[dict]]]:
    """``{point: {method: [rows sorted by seed]}}``."""
    out: dict[tuple, dict[str, list[dict]]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        point = tuple(r[k] for k in keys)
        out.setdefault(point, {}).setdefault(r["method"], []).append(r)
    return out


def summarise(
    rows: list[dict], methods: list[str], keys: list[str] = (), baseline: str = "random"
) -> tuple[list, list]:
    """Per (grid point, method) mean/std table, and paired t-tests against ``baseline`` over
    seeds (pairs = seeds both ran)."""
    from scipy import stats

    table, tests = [], []
    for point, by_method in _groups(rows, list(keys)).items():
        base = {r["seed"]: r for r in by_method.get(baseline, [])}
        for m in [m for m in methods if m in by_method]:
            runs = by_method[m]
            row = {**dict(zip(keys, point)), "method": m, "runs": len(runs)}
            for k in METRICS:
                vals = np.array([r[k] for r in runs], float)
                row[f"{k}_mean"] = float(vals.mean())
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            for stage in PER_RUN:
                row[f"{stage}_seconds"] = float(np.mean([r[f"{stage}_seconds"] for r in runs]))
            table.append(row)
            if m == baseline or not base:
                continue
            paired = [(r, base[r["seed"]]) for r in runs if r["seed"] in base]
            for k in METRICS:
                a = np.array([p[0][k] for p in paired])
                b = np.array([p[1][k] for p in paired])
                t, p = (
                    stats.ttest_rel(a, b)
                    if len(a) >= 2 and np.any(a != b)
                    else (float("nan"), float("nan"))
                )
                tests.append(
                    {
                        **dict(zip(keys, point)),
                        "method": m,
                        "metric": k,
                        "n_pairs": len(a),
                        "mean_diff": float(np.mean(a - b)),
                        "t": float(t),
                        "p": float(p),
                    }
                )
    return table, tests


def _seed_mean(runs: list[dict], seeds: list[int]) -> tuple[np.ndarray, dict]:
    """Per-user metrics averaged over ``seeds`` (users in row order)."""
    total, users = {}, None
    for r in (r for r in runs if r["seed"] in seeds):
        rows, values = run_user_metrics(r)
        order = np.argsort(rows)
        if users is not None and not np.array_equal(users, rows[order]):
            raise UserError(f"{r['predictions']}: evaluated other users than the other runs")
        users = rows[order]
        for k in METRICS:
            total[k] = total.get(k, 0.0) + values[k][order] / len(seeds)
    return users, total


def user_tests(
    rows: list[dict], methods: list[str], keys: list[str] = (), baseline: str = "random"
) -> list[dict]:
    """Per-user paired tests against ``baseline`` (each user's metric averaged over the seeds
    both methods ran): paired t-test and Wilcoxon signed-rank test, pairs = users. Each row
    has the method's mean (``mean``) and the baseline's (``baseline_mean``)."""
    from scipy import stats

    out = []
    for point, by_method in _groups(rows, list(keys)).items():
        if baseline not in by_method:
            continue
        for m in [m for m in methods if m in by_method and m != baseline]:
            seeds = sorted(
                {r["seed"] for r in by_method[m]} & {r["seed"] for r in by_method[baseline]}
            )
            if not seeds:
                continue
            users, a = _seed_mean(by_method[m], seeds)
            _, b = _seed_mean(by_method[baseline], seeds)
            for k in METRICS:
                d = a[k] - b[k]
                nonzero = np.any(d != 0)
                t, p_t = stats.ttest_rel(a[k], b[k]) if nonzero else (np.nan, np.nan)
                p_w = stats.wilcoxon(a[k], b[k]).pvalue if nonzero else np.nan
                out.append(
                    {
                        **dict(zip(keys, point)),
                        "method": m,
                        "metric": k,
                        "n_users": len(users),
                        "seeds": len(seeds),
                        "mean": float(a[k].mean()),
                        "baseline": baseline,
                        "baseline_mean": float(b[k].mean()),
                        "mean_diff": float(d.mean()),
                        "better": int((d > 0).sum()),
                        "worse": int((d < 0).sum()),
                        "t": float(t),
                        "p_ttest": float(p_t),
                        "p_wilcoxon": float(p_w),
                    }
                )
    return out


def mean_std(row: dict, metric: str) -> str:
    """``metric``'s mean +- std over the seeds of a summary ``row``; the mean alone for one
    run (a std over one seed is not zero, it is unknown)."""
    mean = f"{row[f'{metric}_mean']:.4f}"
    return mean if row.get("runs", 2) < 2 else f"{mean} ± {row[f'{metric}_std']:.4f}"


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        fields = [k for k in rows[0] if not k.startswith("_")]  # "_per_user": arrays
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _md_table(header: list[str], lines: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(map(str, cells)) + " |" for cells in lines],
    ]


def markdown(
    table: list[dict],
    tests: list[dict],
    utests: list[dict],
    shared_seconds: dict,
    keys: list[str] = (),
    baseline: str = "random",
) -> str:
    """``results.md``: the mean +- std table, then the tests against ``baseline``."""
    keys = list(keys)
    lines = _md_table(
        [*keys, "method", "runs", *METRICS, "select s", "finetune s", "evaluate s"],
        [
            [
                *(r[k] for k in keys),
                r["method"],
                r["runs"],
                *(mean_std(r, k) for k in METRICS),
                *(f"{r[f'{s}_seconds']:.0f}" for s in PER_RUN),
            ]
            for r in table
        ],
    )
    lines.append("")
    if shared_seconds:
        shared = ", ".join(f"{k} {v:.0f} s" for k, v in shared_seconds.items())
        lines += [f"Shared stages: {shared}", ""]
    if tests:
        lines += [f"Paired t-test against {baseline} over seeds (pairs = seeds):", ""]
        lines += _md_table(
            [*keys, "method", "metric", "pairs", "mean diff", "t", "p"],
            [
                [
                    *(t[k] for k in keys),
                    t["method"],
                    t["metric"],
                    t["n_pairs"],
                    f"{t['mean_diff']:+.4f}",
                    f"{t['t']:.3f}",
                    f"{t['p']:.4f}",
                ]
                for t in tests
            ],
        )
        lines.append("")
    if utests:
        lines += [
            f"Paired tests against {baseline} over users (each user's metric averaged over "
            "seeds; pairs = users):",
            "",
        ]
        lines += _md_table(
            [
                *keys,
                "method",
                "metric",
                "users",
                "seeds",
                "method mean",
                f"{baseline} mean",
                "diff",
                "users better / worse",
                "t-test p",
                "Wilcoxon p",
            ],
            [
                [
                    *(t[k] for k in keys),
                    t["method"],
                    t["metric"],
                    t["n_users"],
                    t["seeds"],
                    f"{t['mean']:.4f}",
                    f"{t['baseline_mean']:.4f}",
                    f"{t['mean_diff']:+.4f}",
                    f"{t['better']} / {t['worse']}",
                    f"{t['p_ttest']:.4f}",
                    f"{t['p_wilcoxon']:.4f}",
                ]
                for t in utests
            ],
        )
    return "\n".join(lines) + "\n"


def bar_plot(path: Path, table: list[dict], keys: list[str] = (), title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table)), 4))
    x = np.arange(len(table))
    width = 0.8 / len(METRICS)
    for j, k in enumerate(METRICS):
        ax.bar(
            x + j * width,
            [r[f"{k}_mean"] for r in table],
            width,
            yerr=[r[f"{k}_std"] for r in table],
            label=k,
            capsize=2,
        )
    labels = [" ".join([r["method"], *(f"{k}={r[k]}" for k in keys)]) for r in table]
    ax.set_xticks(x + width * (len(METRICS) - 1) / 2, labels, rotation=30, ha="right")
    ax.set_ylabel("metric (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.set_title(title or "Few-shot fine-tuned recommender, by selection method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def read_experiment(args: ExperimentArgs) -> tuple[dict, ExperimentConfig, list[Cell]]:
    """Read and check the whole experiment (config, methods, sweep) before anything runs."""
    data = read_experiment_file(args.config, extra_sections=("experiment",))
    source = f"{args.config} [experiment]"
    exp = make_config(ExperimentConfig, data.get("experiment") or {}, source)
    if not exp.methods or not exp.seeds:
        raise UserError(f"{source}: methods and seeds must not be empty")
    if exp.user_groups < 0 or (exp.user_groups and exp.reference not in exp.methods):
        raise UserError(
            f"{source}: user_groups must be >= 0 and the reference method "
            f"{exp.reference!r} one of the methods"
        )
    if exp.baseline and exp.baseline not in exp.methods:
        raise UserError(f"{source}: baseline {exp.baseline!r} is not one of the methods")
    if exp.user_groups and exp.reference_seed == "next" and len(exp.seeds) < 2:
        raise UserError(f"{source}: reference_seed 'next' needs at least 2 seeds")
    for method in exp.methods:
        try:
            check_method(method)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
    for name, chosen, known in (
        ("--methods", args.methods, exp.methods),
        ("--seeds", args.seeds, exp.seeds),
    ):
        extra = [c for c in chosen if c not in known]
        if extra:
            raise UserError(f"{name}: {extra[0]!r} is not in the config's {name[2:]} {known}")
    cells = experiment_cells(exp, check_sweep(exp.sweep, data, source))
    return data, exp, cells


def baseline_of(exp: ExperimentConfig) -> str:
    """The method the tests compare with: ``exp.baseline``, or ``random`` when it is empty."""
    return exp.baseline or "random"


def chosen_points(points: list[str], sweep: dict) -> dict[str, list]:
    """``--points`` as ``{swept key: [values]}``; each ``KEY=VALUE`` must name a swept key and
    one of its values in the config (``VALUE`` read as YAML: ``512`` is an int)."""
    import yaml

    chosen: dict[str, list] = {}
    for item in points:
        key, sep, text = item.partition("=")
        if not sep or key not in sweep:
            raise UserError(
                f"--points: {item!r} is not KEY=VALUE with KEY a swept key of the config "
                f"({', '.join(sweep) or 'no sweep'})"
            )
        value = yaml.safe_load(text)
        if value not in sweep[key]:
            raise UserError(f"--points: {value!r} is not in the config's sweep {key}: {sweep[key]}")
        chosen.setdefault(key, []).append(value)
    return chosen


def selected_cells(cells: list[Cell], args: ExperimentArgs, sweep: dict) -> list[Cell]:
    """The cells to run now: those of ``--methods``, ``--seeds`` and ``--points`` (each
    empty = all)."""
    points = chosen_points(args.points, sweep)
    return [
        c
        for c in cells
        if (not args.methods or c.method in args.methods)
        and (not args.seeds or c.seed in args.seeds)
        and all(v in points[k] for k, v in c.point if k in points)
    ]


def main(args: ExperimentArgs) -> int:
    data, exp, cells = read_experiment(args)
    todo = selected_cells(cells, args, exp.sweep)
    pipe = data["pipeline"]
    workdir, dataset, log = prepare_workdir(data, args)
    wired = wire(data, workdir, dataset, pipe.backend)
    llm = {m: uses_llm_reps(pipe, data, m) for m in exp.methods}
    reads = {m: shared_reads(pipe, m, llm[m]) for m in exp.methods}
    shared = pipe.active(sorted({s for c in todo for s in reads[c.method]}))
    shared += add_score_stages(wired, sorted({c.method for c in todo}))
    log.say(
        f"dealrec experiment {args.config} ({pipe.backend}): {len(cells)} runs "
        f"({len(exp.methods)} methods x {len(exp.seeds)} seeds x "
        f"{len(cells) // (len(exp.methods) * len(exp.seeds))} grid points), "
        f"{len(todo)} of them now, in {workdir}"
    )
    # a run depends on the shared stages it reads (run now or earlier)
    upstream = {
        m: digest([key_options(s, wired[s]) for s in reads[m]] + baseline_score_options(wired, m))
        for m in exp.methods
    }
    archive = RunArchive(exp.archive) if exp.archive else None
    # each cell's folder, wired sections, reuse key and whether its folder holds it finished
    prepared = {}
    for cell in cells:
        d, w = wire_cell(wired, workdir, cell, llm[cell.method])
        key = stage_keys(list(PER_RUN), w, upstream[cell.method])["evaluate"]
        done = stages_finished(list(PER_RUN), w, d / "stages.json", upstream[cell.method])
        prepared[cell] = (d, w, key, done)
    shared_seconds = (
        run_stages(shared, wired, workdir, log)
        if archive is None or any(not (prepared[c][3] or prepared[c][2] in archive) for c in todo)
        else recorded_seconds(shared, workdir, log)
    )
    rows = []
    for cell in cells:
        d, w, key, finished = prepared[cell]
        if not finished and archive is not None and key in archive:
            if cell in todo:
                log.say(f"run {cell.name}: archived in {archive.folder}, not rerun")
            rows.append(
                archive.row(key, {**dict(cell.point), "method": cell.method, "seed": cell.seed})
            )
            continue
        if cell in todo:
            d.mkdir(parents=True, exist_ok=True)
            log.say(f"run {cell.name}" + (f" (in {d.name})" if d.name != cell.name else ""))
            seconds = run_stages(
                list(PER_RUN),
                w,
                d,
                log,
                state_file=d / "stages.json",
                upstream=upstream[cell.method],
            )
        elif finished:
            state = json.loads((d / "stages.json").read_text())
            seconds = {s: state[s].get("seconds", 0.0) for s in PER_RUN}
        else:
            continue
        rows.append(cell_row(cell, d, seconds, key, stage_output("finetune", w["finetune"])))
        if archive is not None:
            archive_run(archive, rows[-1])
    keys = list(exp.sweep)
    results = workdir / "studies" / exp.name if exp.name else workdir
    results.mkdir(parents=True, exist_ok=True)
    write_results(results, rows, exp.methods, keys, shared_seconds, baseline_of(exp))
    if exp.user_groups > 0:
        groups = group_rows(
            rows, keys, exp.reference, exp.user_groups, exp.reference_seed, exp.seeds
        )
        table, tests = summarise(groups, exp.methods, [*keys, "group"], baseline_of(exp))
        write_csv(results / "groups.csv", table)
        (results / "groups.md").write_text(
            f"Users split into {exp.user_groups} equal groups by their test loss under the "
            f"{exp.reference!r} run of the {exp.reference_seed} seed (group 1: lowest loss)\n\n"
            + markdown(table, tests, [], {}, [*keys, "group"], baseline_of(exp))
        )
    write_json(
        results / "experiment.json",
        {
            "config": str(args.config),
            "backend": pipe.backend,
            "methods": exp.methods,
            "seeds": exp.seeds,
            "sweep": exp.sweep,
            "runs_finished": len(rows),
            "runs_total": len(cells),
            "finished": time.time(),
        },
    )
    if len(rows) < len(cells):
        log.say(
            f"{len(rows)} of {len(cells)} runs finished; run the command again (without "
            "--methods/--seeds) to finish the rest"
        )
    print((results / "results.md").read_text())
    return 0


def recorded_seconds(shared: list[str], workdir: Path, log) -> dict:
    """The shared stages' seconds as ``workdir/stages.json`` recorded them (those it has),
    when every run asked for is archived or finished, so no shared stage needs to run (a fresh
    clone rebuilds an archived experiment's tables without recomputing the surrogate)."""
    log.say("every run asked for is archived or finished: the shared stages are not needed")
    state_file = workdir / "stages.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return {s: state[s].get("seconds", 0.0) for s in shared if s in state}


def archive_run(archive: RunArchive, row: dict) -> None:
    """Add the finished run ``row`` to ``archive`` with its per-user metrics and (when its
    evaluation recorded them) test losses, and save the archive at once."""
    users, metrics = run_user_metrics(row)
    try:
        loss_users, loss = run_user_losses(row)
    except UserError:
        loss = None
    if loss is not None and not np.array_equal(loss_users, users):
        loss = None
    if archive.add(row, users, metrics, loss):
        archive.save()


def write_results(
    workdir: Path,
    rows: list[dict],
    methods: list[str],
    keys: list[str],
    shared_seconds: dict,
    baseline: str = "random",
) -> None:
    """The tables (CSV and Markdown), the tests against ``baseline`` and the plot of the
    finished runs."""
    table, tests = summarise(rows, methods, keys, baseline)
    utests = user_tests(rows, methods, keys, baseline)
    write_csv(workdir / "runs.csv", rows)
    write_csv(workdir / "results.csv", table)
    write_csv(workdir / "ttest.csv", tests)
    write_csv(workdir / "usertest.csv", utests)
    (workdir / "results.md").write_text(
        markdown(table, tests, utests, shared_seconds, keys, baseline)
    )
    if table:
        bar_plot(workdir / "results.png", table, keys)


__all__ = [
    "ExperimentConfig",
    "ExperimentArgs",
    "Cell",
    "check_sweep",
    "per_user_metrics",
    "per_user_losses",
    "loss_groups",
    "group_rows",
    "summarise",
    "user_tests",
    "main",
]
