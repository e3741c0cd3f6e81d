"""``dealrec report RUN_DIR``: PNG plots of a pipeline run's scores and selection (and, for a
``dealrec experiment`` folder, the paper's figures: :mod:`jaxrec.figures`).

Reads what the pipeline wrote in ``RUN_DIR`` (``influence.npy``, ``effort.npy``,
``selected.npy`` with their manifests, and the LiSSA norm trace ``influence_trace.npy``) and
writes, in ``RUN_DIR/report/``:

* ``scores_hist.png``: histograms of the influence and effort scores (paper Eq. 11, 12);
* ``scores_scatter.png``: min-max normalised influence against effort, selected users marked;
* ``groups.png``: the size of each score group of Algorithm 2 and how many were selected;
* ``lissa_trace.png``: ``||h_t||`` over the LiSSA steps (one line per repeat).

Plots whose inputs are missing are skipped with a note.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxrec.config_io import help_of, option
from jaxrec.data import load_scores, read_manifest
from jaxrec.errors import UserError
from jaxrec.experiment.plots import pyplot
from jaxrec.figures import experiment_figures


@dataclass
class ReportArgs:
    """Command line of ``dealrec report RUN_DIR``."""

    run_dir: str = field(
        metadata={
            "help": "a pipeline workdir (holds influence.npy, ...) or an experiment's results "
            "folder (results.csv, experiment.json: the paper's figures)"
        }
    )
    out: str = option("", "folder for the PNGs; empty = RUN_DIR/report")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run_dir", help=help_of(ReportArgs, "run_dir"))
        parser.add_argument("--out", default="", help=help_of(ReportArgs, "out"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ReportArgs:
        return cls(run_dir=args.run_dir, out=args.out)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def make_report(run_dir: str | Path, out: str | Path = "") -> list[Path]:
    """Write the report's PNGs and return their paths."""
    plt = pyplot()
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: run folder not found")
    out = Path(out) if out else run / "report"
    scores = {}
    for kind in ("influence", "effort"):
        if (run / f"{kind}.npy").is_file():
            scores[kind] = load_scores(run / f"{kind}.npy", kind=kind)[0].astype(np.float64)
    selected = None
    sel_manifest: dict = {}
    if (run / "selected.npy").is_file():
        selected, sel_manifest = load_scores(run / "selected.npy", kind="selection")
    info = sel_manifest.get("selection") or {}
    trace = (run / "influence_trace.npy").is_file()
    if not (scores or info.get("group_sizes") or trace):
        raise UserError(
            f"{run}: nothing to plot (no influence.npy, effort.npy or selected.npy; "
            "report takes a pipeline workdir or an experiment folder)"
        )
    out.mkdir(parents=True, exist_ok=True)  # everything read and checked: now write
    written = []
    if scores:
        written.append(_plot_hist(plt, scores, out / "scores_hist.png"))
    if len(scores) == 2:
        written.append(_plot_scatter(plt, scores, selected, out / "scores_scatter.png"))
    if info.get("group_sizes"):
        written.append(_plot_groups(plt, info, out / "groups.png"))
    if trace:
        written.append(_plot_trace(plt, run, out / "lissa_trace.png"))
    return written


def _plot_hist(plt, scores: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 3.5), squeeze=False)
    for ax, (kind, s) in zip(axes[0], scores.items()):
        ax.hist(s, bins=80, color="tab:blue" if kind == "influence" else "tab:orange")
        ax.set_yscale("log")
        ax.set_title(f"{kind} score ({len(s)} users)")
        ax.set_xlabel("score")
        ax.set_ylabel("users (log)")
    fig.tight_layout()
    return _save(fig, path, plt)


def _plot_scatter(plt, scores: dict, selected, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    inf, eff = _minmax(scores["influence"]), _minmax(scores["effort"])
    ax.scatter(inf, eff, s=2, alpha=0.3, color="grey", label="all users")
    if selected is not None:
        ax.scatter(
            inf[selected], eff[selected], s=6, color="tab:red", label=f"selected ({len(selected)})"
        )
    ax.set_xlabel("influence (min-max)")
    ax.set_ylabel("effort (min-max)")
    ax.legend(markerscale=3)
    ax.set_title("Influence vs effort")
    fig.tight_layout()
    return _save(fig, path, plt)


def _plot_groups(plt, info: dict, path: Path) -> Path:
    """Users per score group and those selected from it, each on its own linear axis (on one
    log axis the few selected users of a group were cut off, and a group with none vanished)."""
    sizes = np.asarray(info["group_sizes"])
    chosen = np.asarray(info.get("group_selected") or np.zeros_like(sizes))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.8), sharex=True)
    x = np.arange(len(sizes))
    top.bar(x, sizes, color="lightgrey")
    top.set_ylabel("users in group")
    bottom.bar(x, chosen, color="tab:red")
    bottom.set_ylabel("selected")
    bottom.set_ylim(0, max(1, int(chosen.max())) * 1.1)
    bottom.set_xlabel("score group (low -> high overall score)")
    top.set_title(
        f"Coverage-enhanced sampling: {int(chosen.sum())} selected, "
        f"{info.get('n_pruned', 0)} hard-pruned"
    )
    fig.tight_layout()
    return _save(fig, path, plt)


def _plot_trace(plt, run: Path, path: Path) -> Path:
    trace = np.atleast_2d(np.load(run / "influence_trace.npy", allow_pickle=False))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r, row in enumerate(trace):
        ax.plot(np.arange(1, len(row) + 1), row, lw=1, label=f"repeat {r}")
    ax.set_xlabel("LiSSA step t")
    ax.set_ylabel("||h_t||")
    options = (
        read_manifest(run / "influence.npy").get("options", {})
        if (run / "influence.npy").is_file()
        else {}
    )
    ax.set_title(
        f"LiSSA norm trace (scale {options.get('scale')}, damping {options.get('damping')})"
    )
    if len(trace) > 1:
        ax.legend()
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: ReportArgs) -> int:
    """Plots of a run; for an experiment folder also the paper's figures
    (:mod:`jaxrec.figures`)."""
    paths = []
    if (Path(args.run_dir) / "experiment.json").is_file():
        paths += experiment_figures(args.run_dir, args.out)
    try:
        paths += make_report(args.run_dir, args.out)
    except UserError:
        if not paths:
            raise
    for path in paths:
        print(path)
    return 0
