"""The LDS study's report: its Markdown table and bar plot (:func:`jaxrec.lds.study.run`'s
``results.md`` and ``lds.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxrec.figures import _plt
from jaxrec.lds.stats import spearman_columns


def summary(scored: dict, attr: np.ndarray, ref: np.ndarray | None) -> dict:
    """One attribution's row of ``results["lds"]`` (with the comparison to ``exact``)."""
    out = {x: scored[x] for x in ("lds", "ci_low", "ci_high", "users")}
    if ref is not None:
        out["spearman_vs_exact"] = float(spearman_columns(attr.ravel(), ref.ravel())[0])
        out["minus_exact"] = scored["minus_exact"]
    return out


def _cost_cells(cost: dict) -> str:
    """`` seconds | peak RSS | added RSS |`` of one estimator in GiB (``-`` where unknown: a
    cached attribution of a run made before costs were recorded). The peak is the estimator's
    own sampled peak where recorded, else the process's high-water mark marked ``<=`` (an
    upper bound: it includes whatever ran before in the process)."""
    seconds = cost.get("seconds", {}).get("total")
    own, added = cost.get("host_block_peak_rss_bytes"), cost.get("host_added_rss_bytes")
    rss = cost.get("host_peak_rss_bytes")
    peak = f"{own / 2**30:.2f}" if own else (f"<= {rss / 2**30:.2f}" if rss else "-")
    return (
        (f" {seconds:.1f} |" if seconds is not None else " - |")
        + f" {peak} |"
        + (f" {added / 2**30:.2f} |" if added is not None else " - |")
    )


def markdown_table(results: dict) -> str:
    """The LDS table of :func:`run`'s results: one row per attribution, with the interval,
    when ``exact`` ran the paired difference to it and the Spearman of the attributions, and
    each estimator's seconds, peak host memory and the memory it added (:func:`_cost_cells`)."""
    level = int(round(100 * results["config"]["level"]))
    vs = all("minus_exact" in v for v in results["lds"].values())
    head = f"| attribution | LDS | {level}% CI | users |"
    if vs:
        head += f" LDS - exact [{level}% CI, paired] | Spearman of a[i, j] with exact |"
    costs = results.get("costs", {})
    head += " seconds | peak RSS (GiB) | added RSS (GiB) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, v in results["lds"].items():
        row = (
            f"| {name} | {v['lds']:.3f} | [{v['ci_low']:.3f}, {v['ci_high']:.3f}] | {v['users']} |"
        )
        if vs:
            d = v["minus_exact"]
            row += (
                f" {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |"
                f" {v['spearman_vs_exact']:.3f} |"
            )
        lines.append(row + _cost_cells(costs.get(name, {})))
    return "\n".join(lines) + "\n"


def bar_plot(results: dict, path: Path) -> Path:
    """A bar per attribution: LDS with its bootstrap interval as the error bar."""
    plt = _plt()
    names = list(results["lds"])
    vals = np.array([results["lds"][k]["lds"] for k in names])
    lo = vals - np.array([results["lds"][k]["ci_low"] for k in names])
    hi = np.array([results["lds"][k]["ci_high"] for k in names]) - vals
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 3.4))
    ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=3, color="#4c72b0")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("LDS")
    ax.set_title(
        f"{results['model']}, {results['users']} users, M={results['subsets']}, "
        f"{results['seeds']} seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
