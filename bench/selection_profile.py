"""What a selection method's subsets look like, run by run, beside the run's result.

For every finished run folder of one or more experiment workdirs (``RUNS/<method>-seed<k>``):
the selected users' mean train length, how many of them have a validation item (the
early-stopping set under ``finetune.valid_users: selected``, issue 25), the fine-tune's best
and last epoch, Recall@20 and the test loss (from the archive's per-user file, by run key). Then
per method the means, and Spearman's rank correlation of each descriptor with R@20 and with the
test loss over runs, within each method and pooled.

Usage::

    python bench/selection_profile.py --data ../shared/data/games \\
        --archive results/tiger_games WORKDIR [WORKDIR ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def lengths(path: Path) -> np.ndarray:
    """Number of items per user (line order) of one split file."""
    return np.array([len(line.split()) - 1 for line in path.read_text().splitlines()])


def seed_of(name: str) -> int:
    """The seed of a run folder ``METHOD-seedK`` or ``METHOD-seedK-KEY=VALUE...`` (a grid point)."""
    return int(re.match(r".*-seed(\d+)", name).group(1))


def label(name: str) -> str:
    """The method of a run folder, with its grid point if any
    (``dealrec select.hard_prune=0.0``)."""
    method, rest = re.match(r"(.*)-seed\d+-?(.*)", name).groups()
    return f"{method} {rest}" if rest else method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workdirs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/games"))
    ap.add_argument("--archive", type=Path, default=Path("results/tiger_games"))
    a = ap.parse_args()
    train = lengths(a.data / "sequential_train.txt")
    valid = lengths(a.data / "sequential_valid.txt") > 0
    keys = {r["key"]: r for r in csv.DictReader(open(a.archive / "runs.csv"))}
    per_user = np.load(a.archive / "per_user.npz", allow_pickle=False)
    rows = []
    for wd in a.workdirs:
        for run in sorted((wd / "runs").glob("*-seed*")):
            rec = run / "adapter" / "train_record.json"
            if not (run / "metrics.json").exists() or not rec.exists():
                continue
            sel = np.load(run / "selected.npy", allow_pickle=False)
            r = json.loads(rec.read_text())
            m = json.loads((run / "metrics.json").read_text())
            # the archive row of this run: the one with its exact Recall@20
            key = next(
                (k for k, row in keys.items() if float(row["recall@20"]) == m["recall@20"]), ""
            )
            loss = per_user[f"{key}.loss"].mean() if f"{key}.loss" in per_user else np.nan
            rows.append({
                "method": label(run.name), "seed": seed_of(run.name),
                "train_len": train[sel].mean(), "valid_users": int(valid[sel].sum()),
                "best_epoch": r["best_epoch"], "epochs": len(r["epochs"]),
                "recall@20": m["recall@20"], "test_loss": float(loss),
            })  # fmt: skip
    cols = ["train_len", "valid_users", "best_epoch", "epochs", "recall@20", "test_loss"]
    print("| method | seed | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
        print(f"| {r['method']} | {r['seed']} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    methods = sorted({r["method"] for r in rows})
    print(
        "\nMeans per method\n\n| method | runs | "
        + " | ".join(cols)
        + " |\n|---|---|"
        + "---|" * len(cols)
    )
    for me in methods:
        sub = [r for r in rows if r["method"] == me]
        print(
            f"| {me} | {len(sub)} | "
            + " | ".join(f"{np.mean([r[c] for r in sub]):.4g}" for c in cols)
            + " |"
        )
    print("\nSpearman over runs (descriptor vs R@20 / vs test loss)\n")
    print(
        "| runs | n | "
        + " | ".join(f"{c}: R@20 / loss" for c in cols[:4])
        + " |\n|---|---|"
        + "---|" * 4
    )
    for me in [*methods, "pooled"]:
        sub = [r for r in rows if me in ("pooled", r["method"])]
        cells = []
        for c in cols[:4]:
            x = [r[c] for r in sub]
            cells.append(" / ".join(f"{spearmanr(x, [r[t] for r in sub]).statistic:+.2f}"
                                    for t in ("recall@20", "test_loss")))  # fmt: skip
        print(f"| {me} | {len(sub)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
