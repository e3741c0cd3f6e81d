"""The paper's figures redrawn from a ``dealrec experiment`` folder (``dealrec report EXP_DIR``).

Reads ``experiment.json``, ``results.csv`` and, when the experiment split users into groups,
``groups.csv`` (all written by :mod:`jaxrec.experiment`), and writes PNGs and Markdown:

* ``methods.png`` (paper Fig. 4, the ablations): every metric per method, error bars = std over
  seeds (none for a method with one seed: its spread is unknown, not zero);
* ``sweep_KEY.png`` (Fig. 5 for ``select.n``, Fig. 7 for ``select.lamda``, the K sweep for
  ``select.groups``; drawn only for a key with >= 2 finished values): every metric against the
  swept value, one line per method; for
  ``select.n`` the fine-tuning time on a second axis;
* ``groups.png`` (Fig. 6): Recall@20 and NDCG@20 per user group and method, with a caption
  saying what the groups are;
* ``full.md`` (Table 3): with a method ``all`` in the experiment, every method's metrics and
  fine-tuning time beside full fine-tuning, with the time ratio.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from jaxrec.errors import UserError
from jaxrec.experiment.plots import error_bars, pyplot
from jaxrec.experiment.tables import mean_std

_plt = pyplot  # the name jaxrec.lds draws with

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def read_table(path: Path) -> list[dict]:
    """A CSV written by the experiment, numbers parsed."""

    def parse(v: str):
        try:
            return float(v) if any(c in v for c in ".en") else int(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def methods_figure(table: list[dict], path: Path) -> Path:
    """Fig. 4: each metric per method (mean +- std over seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))
    names = [r["method"] for r in table]
    for ax, k in zip(axes, METRICS):
        ax.bar(
            range(len(table)),
            [r[f"{k}_mean"] for r in table],
            yerr=error_bars(table, k),
            capsize=3,
            color=["#d62728" if n == "dealrec" else "#7f7f7f" for n in names],
        )
        ax.set_xticks(range(len(table)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(k)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_figure(table: list[dict], key: str, path: Path) -> Path:
    """Fig. 5 / 7: each metric against the swept ``key``, one line per method; for ``select.n``
    the mean fine-tuning seconds on a second axis (dashed)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.4))
    methods = list(dict.fromkeys(r["method"] for r in table))
    for ax, k in zip(axes, METRICS):
        for m in methods:
            rows = sorted((r for r in table if r["method"] == m), key=lambda r: r[key])
            ax.errorbar(
                [r[key] for r in rows],
                [r[f"{k}_mean"] for r in rows],
                yerr=error_bars(rows, k),
                marker="o",
                capsize=3,
                label=m,
            )
        ax.set_xlabel(key)
        ax.set_title(k)
        if key == "select.n":
            ax.set_xscale("log", base=2)
            twin = ax.twinx()
            for m in methods:
                rows = sorted((r for r in table if r["method"] == m), key=lambda r: r[key])
                twin.plot(
                    [r[key] for r in rows],
                    [r["finetune_seconds"] for r in rows],
                    ls="--",
                    alpha=0.5,
                )
            twin.set_ylabel("fine-tune s (dashed)", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def groups_figure(table: list[dict], path: Path) -> Path:
    """Fig. 6: Recall@20 and NDCG@20 per user group (1 = lowest loss) and method."""
    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in table))
    groups = sorted({int(r["group"]) for r in table})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.8 / len(methods)
    for ax, k in zip(axes, ("recall@20", "ndcg@20")):
        for j, m in enumerate(methods):
            rows = {int(r["group"]): r for r in table if r["method"] == m}
            ax.bar(
                np.arange(len(groups)) + j * width,
                [rows[g][f"{k}_mean"] for g in groups],
                width,
                yerr=error_bars([rows[g] for g in groups], k),
                capsize=3,
                label=m,
            )
        names = [f"group {g}" for g in groups]
        names[0] += "\n(lowest loss)"
        names[-1] += "\n(highest loss)"
        ax.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2, names)
        ax.set_title(k)
    axes[0].legend(fontsize=8)
    fig.text(
        0.5,
        0.01,
        f"Test users split into {len(groups)} equal groups by their test loss under the "
        "reference method's run (experiment.reference): group 1 the easiest, "
        f"group {groups[-1]} the hardest. Error bars: std over seeds (none for one seed).",
        ha="center",
        fontsize=7,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def full_table(table: list[dict]) -> str:
    """Table 3: each method beside full fine-tuning (method ``all``), with the time ratio."""
    full = next(r for r in table if r["method"] == "all")
    lines = [
        "| method | " + " | ".join(METRICS) + " | fine-tune s | time / full |",
        "|---|" + "---|" * (len(METRICS) + 2),
    ]
    for r in table:
        cells = [mean_std(r, k) for k in METRICS]
        ratio = r["finetune_seconds"] / full["finetune_seconds"] if full["finetune_seconds"] else 0
        lines.append(
            f"| {r['method']} | "
            + " | ".join(cells)
            + f" | {r['finetune_seconds']:.0f} | {ratio:.3f} |"
        )
    return "\n".join(lines) + "\n"


def experiment_figures(workdir: str | Path, out: str | Path = "") -> list[Path]:
    """Draw every figure the experiment in ``workdir`` has results for; return the files.

    Args:
      workdir: a ``dealrec experiment`` folder (holds ``experiment.json``, ``results.csv``).
      out: folder for the figures (default ``workdir/report``).
    """
    workdir = Path(workdir)
    if not (workdir / "results.csv").is_file():
        raise UserError(f"{workdir}: no results.csv (has the experiment finished a run?)")
    out = Path(out) if out else workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    info = json.loads((workdir / "experiment.json").read_text())
    table = read_table(workdir / "results.csv")
    keys = list(info.get("sweep") or {})
    written = []
    for key in keys:
        others = [k for k in keys if k != key]
        fixed = [r for r in table if all(r[o] == table[0][o] for o in others)]
        if len({r[key] for r in fixed}) < 2:
            continue  # one point is no sweep: its numbers are in results.md
        written.append(sweep_figure(fixed, key, out / f"sweep_{key}.png"))
    if not written:  # no sweep, or only one-point ones
        written.append(methods_figure(table, out / "methods.png"))
    if (workdir / "groups.csv").is_file():
        written.append(groups_figure(read_table(workdir / "groups.csv"), out / "groups.png"))
    if any(r["method"] == "all" for r in table) and not keys:
        path = out / "full.md"
        path.write_text(full_table(table))
        written.append(path)
    return written
