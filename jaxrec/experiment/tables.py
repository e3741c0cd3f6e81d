"""The experiment's tables: CSV files and ``results.md``."""

from __future__ import annotations

import csv
from pathlib import Path

from jaxrec.experiment.grid import METRICS, PER_RUN
from jaxrec.experiment.plots import bar_plot
from jaxrec.experiment.stats import summarise, user_tests


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
