"""The experiment's tables: CSV files and ``results.md``."""

from __future__ import annotations

from collections.abc import Sequence
import csv
import math
from pathlib import Path

from jaxrec.experiment.grid import LOSS, TABLE_METRICS
from jaxrec.experiment.plots import bar_plot, finite_number
from jaxrec.experiment.stats import summarise, user_tests
from jaxrec.stages import PER_RUN


def mean_std(row: dict, metric: str) -> str:
    """``metric``'s mean +- std over the seeds of a summary ``row``; the mean alone for one
    run (a std over one seed is not zero, it is unknown)."""
    mean = f"{row[f'{metric}_mean']:.4f}"
    return mean if row.get("runs", 2) < 2 else f"{mean} ± {row[f'{metric}_std']:.4f}"


def mean_ci(row: dict, metric: str) -> str:
    """``metric``'s mean over the seeds of a summary ``row`` with its 95 % t-interval,
    ``mean [lo, hi]``; the mean alone for one run (its spread is unknown, not zero); ``-`` for a
    metric the runs lack (a test loss the evaluation did not record)."""
    mean, lo = row.get(f"{metric}_mean", math.nan), row.get(f"{metric}_lo", math.nan)
    if not finite_number(mean):
        return "-"
    if row.get("runs", 2) < 2 or not finite_number(lo):
        return f"{mean:.4f}"
    return f"{mean:.4f} [{lo:.4f}, {row[f'{metric}_hi']:.4f}]"


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV, the columns of every row in order of appearance (a row without one of
    them leaves it empty); columns starting with ``_`` (per-user arrays) are left out."""
    if not rows:
        return
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if not k.startswith("_") and k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)


def _md_table(header: list[str], lines: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(map(str, cells)) + " |" for cells in lines],
    ]


def _label(metric: str) -> str:
    return "test loss" if metric == LOSS else metric


def summary_lines(table: list[dict], keys: list[str]) -> list[str]:
    """The seed-level table: per method, each metric's mean [95 % t-interval over seeds]."""
    return [
        "Mean over seeds [95 % t-interval over seeds]; test loss: the mean over the evaluated "
        "users of the fine-tuned model's loss of the test target (lower is better); one run: "
        "the mean alone.",
        "",
        *_md_table(
            [*keys, "method", "runs", *map(_label, TABLE_METRICS), *(f"{s} s" for s in PER_RUN)],
            [
                [
                    *(r[k] for k in keys),
                    r["method"],
                    r["runs"],
                    *(mean_ci(r, k) for k in TABLE_METRICS),
                    *(f"{r[f'{s}_seconds']:.0f}" for s in PER_RUN),
                ]
                for r in table
            ],
        ),
    ]


def seed_test_lines(tests: list[dict], keys: list[str], baseline: str) -> list[str]:
    """The seed-level comparisons with ``baseline`` (:func:`jaxrec.experiment.stats.seed_test`)."""
    boot = any("boot_lo" in t for t in tests)
    lines = [
        f"Difference of the means over seeds (method - {baseline}) with its 95 % interval and "
        "Welch's t-test over seeds (the two methods' runs share no data, so they are not "
        "paired by seed); MDD: the minimum detectable difference (80 % power, alpha 0.05) at "
        "the observed spread"
        + ("; bootstrap: a cluster bootstrap over seeds and users" if boot else "")
        + ":",
        "",
    ]
    rows = []
    for t in tests:
        head = [
            *(t[k] for k in keys),
            t["method"],
            _label(t["metric"]),
            f"{t['runs']} / {t['baseline_runs']}",
            f"{t['mean']:.4f}",
            f"{t['baseline_mean']:.4f}",
        ]
        if "note" in t:
            tail = [f"{t['mean_diff']:+.4f}", t["note"], "", "", ""]
        else:
            tail = [
                f"{t['mean_diff']:+.4f} [{t['lo']:+.4f}, {t['hi']:+.4f}]",
                f"{t['t']:.2f} ({t['df']:.1f})",
                f"{t['p']:.4f}",
                f"{t['mdd']:.4f}",
            ]
            if boot:
                tail.append(f"[{t['boot_lo']:+.4f}, {t['boot_hi']:+.4f}]" if "boot_lo" in t else "")
        rows.append(head + tail[: 4 + boot])
    header = [
        *keys,
        "method",
        "metric",
        f"runs / {baseline} runs",
        "method mean",
        f"{baseline} mean",
        "diff [95 % CI]",
        "Welch t (df)",
        "p",
        "MDD",
        *(["bootstrap 95 % CI"] if boot else []),
    ]
    return lines + _md_table(header, rows)


def user_test_lines(utests: list[dict], keys: list[str], baseline: str) -> list[str]:
    """The per-user tests, labelled as what they are: about the trained models."""
    return [
        f"Per-user paired tests against {baseline}, conditional on the trained models (not "
        "evidence about a method): each user's metric averaged over the seeds both ran; "
        "pairs = users, who all share each run's one selected subset and fine-tuned model.",
        "",
        *_md_table(
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
        ),
    ]


def markdown(
    table: list[dict],
    tests: list[dict],
    utests: list[dict],
    shared_seconds: dict,
    keys: Sequence[str] = (),
    baseline: str = "random",
) -> str:
    """``results.md``: the seed-level table (means and 95 % intervals over seeds), the
    seed-level comparisons with ``baseline`` (the headline), then the per-user tests
    (conditional on the trained models)."""
    keys = list(keys)
    lines = summary_lines(table, keys) + [""]
    if shared_seconds:
        shared = ", ".join(f"{k} {v:.0f} s" for k, v in shared_seconds.items())
        lines += [f"Shared stages: {shared}", ""]
    if tests:
        lines += seed_test_lines(tests, keys, baseline) + [""]
    if utests:
        lines += user_test_lines(utests, keys, baseline)
    return "\n".join(lines) + "\n"


def write_results(
    workdir: Path,
    rows: list[dict],
    methods: list[str],
    keys: list[str],
    shared_seconds: dict,
    baseline: str = "random",
    bootstrap: int = 0,
) -> None:
    """The tables (CSV and Markdown), the tests against ``baseline`` (``bootstrap`` > 0: with
    a cluster bootstrap of that many draws) and the plot of the finished runs."""
    table, tests = summarise(rows, methods, keys, baseline, bootstrap)
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
