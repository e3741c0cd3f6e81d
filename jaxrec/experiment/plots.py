"""The experiment's plot (``results.png``); the paper's figures are :mod:`jaxrec.figures`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxrec.experiment.grid import METRICS
from jaxrec.figures import error_bars


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
