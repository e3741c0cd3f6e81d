"""``dealrec experiment CONFIG``: several selection methods x seeds through fine-tune and
evaluation, with a results table, paired t-tests against ``random`` and a bar plot.

The config file is a pipeline config (:mod:`jaxrec.pipeline`) plus an ``experiment:`` section
(:class:`ExperimentConfig`). The shared stages (surrogate, influence, effort) run once; then for
every (method, seed) the stages select -> finetune -> evaluate run in
``workdir/runs/METHOD-seedS/`` (reused when already done). The evaluation users are the same
for every run (``evaluate.seed`` is not varied), so runs are paired and the t-test is paired
over seeds.

Outputs in ``workdir``: ``results.md``, ``results.csv`` (one row per method: mean and std of
Recall/NDCG@10/20 over seeds, seconds per stage), ``runs.csv`` (one row per run),
``ttest.csv`` and ``results.png``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxrec.config import make_config
from jaxrec.data import write_json
from jaxrec.errors import UserError
from jaxrec.pipeline import (PipelineArgs, add_score_stages, digest, prepare_workdir,
                             read_experiment_file, run_stages, wire)
from jaxrec.select import check_method

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
SHARED = ("surrogate", "influence", "effort")
PER_RUN = ("select", "finetune", "evaluate")
# methods that need the LLM effort score / the influence score files
NEEDS_EFFORT = {"dealrec", "greedy", "effort-only"}


@dataclass
class ExperimentConfig:
    """The ``experiment:`` section of a config file."""
    methods: list[str] = field(default_factory=lambda: ["random", "dealrec"])
    seeds: list[int] = field(default_factory=lambda: [0])


def run_dir(workdir: Path, method: str, seed: int) -> Path:
    return workdir / "runs" / f"{method}-seed{seed}"


def summarise(rows: list[dict], methods: list[str]) -> tuple[list[dict], list[dict]]:
    """Per-method mean/std table and paired t-tests against ``random``."""
    from scipy import stats

    table, tests = [], []
    by_method = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
                 for m in methods}
    for m, runs in by_method.items():
        row = {"method": m, "runs": len(runs)}
        for k in METRICS:
            vals = np.array([r[k] for r in runs], float)
            row[f"{k}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        for stage in PER_RUN:
            row[f"{stage}_seconds"] = float(np.mean([r[f"{stage}_seconds"] for r in runs]))
        table.append(row)
    base = {r["seed"]: r for r in by_method.get("random", [])}
    for m, runs in by_method.items():
        if m == "random" or not base:
            continue
        paired = [(r, base[r["seed"]]) for r in runs if r["seed"] in base]
        for k in METRICS:
            a = np.array([p[0][k] for p in paired])
            b = np.array([p[1][k] for p in paired])
            if len(a) >= 2 and np.any(a - b != 0):
                t, p = stats.ttest_rel(a, b)
            else:
                t, p = float("nan"), float("nan")
            tests.append({"method": m, "metric": k, "n_pairs": len(a),
                          "mean_diff": float(np.mean(a - b)) if len(a) else float("nan"),
                          "t": float(t), "p": float(p)})
    return table, tests


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(table: list[dict], tests: list[dict], shared_seconds: dict) -> str:
    lines = ["| method | runs | " + " | ".join(METRICS) + " | select s | finetune s | evaluate s |",
             "|---|---|" + "---|" * (len(METRICS) + 3)]
    for r in table:
        cells = [f"{r[f'{k}_mean']:.4f} ± {r[f'{k}_std']:.4f}" for k in METRICS]
        secs = [f"{r[f'{s}_seconds']:.0f}" for s in PER_RUN]
        lines.append(f"| {r['method']} | {r['runs']} | " + " | ".join(cells + secs) + " |")
    lines += ["", "Shared stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                 shared_seconds.items()), ""]
    if tests:
        lines += ["Paired t-test against random (pairs = seeds):", "",
                  "| method | metric | pairs | mean diff | t | p |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['method']} | {t['metric']} | {t['n_pairs']} | {t['mean_diff']:+.4f} | "
                  f"{t['t']:.3f} | {t['p']:.4f} |" for t in tests]
    return "\n".join(lines) + "\n"


def bar_plot(path: Path, table: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table)), 4))
    x = np.arange(len(table))
    width = 0.8 / len(METRICS)
    for j, k in enumerate(METRICS):
        ax.bar(x + j * width, [r[f"{k}_mean"] for r in table], width,
               yerr=[r[f"{k}_std"] for r in table], label=k, capsize=2)
    ax.set_xticks(x + width * (len(METRICS) - 1) / 2, [r["method"] for r in table],
                  rotation=30, ha="right")
    ax.set_ylabel("metric (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.set_title("Few-shot fine-tuned LLM recommender, by selection method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: PipelineArgs) -> int:
    data = read_experiment_file(args.config, extra_sections=("experiment",))
    exp = make_config(ExperimentConfig, data.get("experiment") or {}, f"{args.config} [experiment]")
    if not exp.methods or not exp.seeds:
        raise UserError(f"{args.config} [experiment]: methods and seeds must not be empty")
    for method in exp.methods:
        try:
            check_method(method)
        except UserError as err:
            raise UserError(f"{args.config} [experiment]: {err}") from None
    workdir, dataset, log = prepare_workdir(data, args)
    wired = wire(data, workdir, dataset)
    shared = list(SHARED)
    if not NEEDS_EFFORT & set(exp.methods):
        shared.remove("effort")
    shared += add_score_stages(wired, exp.methods)
    log.say(f"dealrec experiment {args.config}: {len(exp.methods)} methods x "
            f"{len(exp.seeds)} seeds in {workdir}")
    shared_seconds = run_stages(shared, wired, workdir, log)
    upstream = digest([wired[s] for s in shared])
    rows = []
    for method in exp.methods:
        for seed in exp.seeds:
            d = run_dir(workdir, method, seed)
            d.mkdir(parents=True, exist_ok=True)
            w = {k: dict(v) for k, v in wired.items()}
            w["select"].update(method=method, seed=seed, out=str(d / "selected.npy"))
            w["finetune"].update(seed=seed, selection=str(d / "selected.npy"),
                                 out=str(d / "adapter"))
            w["evaluate"].update(adapter=str(d / "adapter"), out=str(d / "metrics.json"))
            log.say(f"run {method} seed {seed}")
            seconds = run_stages(list(PER_RUN), w, d, log, state_file=d / "stages.json",
                                 upstream=upstream)
            metrics = json.loads((d / "metrics.json").read_text())
            flat = metrics.get("metrics", metrics)
            rows.append({"method": method, "seed": seed,
                         **{k: float(flat[k]) for k in METRICS},
                         **{f"{s}_seconds": seconds[s] for s in PER_RUN}})
    table, tests = summarise(rows, exp.methods)
    write_csv(workdir / "runs.csv", rows)
    write_csv(workdir / "results.csv", table)
    write_csv(workdir / "ttest.csv", tests)
    (workdir / "results.md").write_text(markdown(table, tests, shared_seconds))
    bar_plot(workdir / "results.png", table)
    write_json(workdir / "experiment.json", {"config": str(args.config), "methods": exp.methods,
                                             "seeds": exp.seeds, "finished": time.time()})
    print((workdir / "results.md").read_text())
    return 0
