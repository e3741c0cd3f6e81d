"""The experiment's plot (``results.png``); the paper's figures are :mod:`jaxrec.figures`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from pathlib import Path

import numpy as np

from jaxrec.experiment.grid import METRICS


def error_bars(rows: list[dict], metric: str) -> list[float] | None:
    """Error bars: the std over seeds where a row has >= 2 runs, none (nan) where it has one
    (its spread is unknown, not zero); ``None`` when no row has a spread."""
    errs = [
        float(r[f"{metric}_std"])
        if r.get("runs", 2) >= 2 and finite_number(r.get(f"{metric}_std"))
        else float("nan")
        for r in rows
    ]
    return errs if any(e == e for e in errs) else None


def finite_number(x: object) -> bool:
    """Whether ``x`` is an int or float and neither nan nor infinite (a table cell)."""
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only), imported when a figure is drawn:
    the CLI imports this package to build its parser, and ``matplotlib.use`` at import would
    switch the backend of a notebook that imports it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(path: Path, table: list[dict], keys: Sequence[str] = (), title: str = "") -> None:
    """Every metric's mean (error bars: std over seeds) per row of the summary ``table``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table)), 4))
    x = np.arange(len(table))
    width = 0.8 / len(METRICS)
    for j, k in enumerate(METRICS):
        ax.bar(
            x + j * width,
            [r[f"{k}_mean"] for r in table],
            width,
            yerr=error_bars(table, k),
            label=k,
            capsize=2,
        )
    labels = [" ".join([r["method"], *(f"{k}={r[k]}" for k in keys)]) for r in table]
    ax.set_xticks(x + width * (len(METRICS) - 1) / 2, labels, rotation=30, ha="right")
    ax.set_ylabel("metric (mean ± std over seeds; one seed: no bar)")
    ax.legend(fontsize=8)
    ax.set_title(title or "Few-shot fine-tuned recommender, by selection method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
