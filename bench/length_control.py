"""A length-matched random control for a finished experiment run: does a selection win by its
scores, or only by the history lengths it picks?

For each user of the run's selection, draw a random user with exactly the same number of train
items (without replacement, seeded; if a length runs out, the nearest length with users left),
then fine-tune and evaluate that selection with the run's own finetune / evaluate options
(its ``resolved.yaml``), through the pipeline's stages. The selection has the run's length
distribution but is otherwise random.

    OMP_NUM_THREADS=1 python bench/length_control.py \\
        "runs/table2_tiger/runs/dealrec-seed0-select.hard_prune=0.0" --seed 0

Writes ``RUN_DIR-lengthmatched/`` (selected.npy, adapter/, metrics.json, stages.json) beside
the run; a finished one is reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from jaxrec.data import load_dataset
from jaxrec.data.scorefiles import save_scores
from jaxrec.pipeline import RunLog, run_stages


def length_matched(lengths: np.ndarray, chosen: np.ndarray, seed: int) -> np.ndarray:
    """Random users with the same train lengths as ``chosen`` (nearest free length when one
    runs out).

    Args:
      lengths: train length of every user.
      chosen: the selection to match (row numbers).
      seed: seeds the draw.
    Returns:
      sorted distinct row numbers, ``len(chosen)`` of them.
    """
    rng = np.random.default_rng(seed)
    pools = {int(n): list(rng.permutation(np.flatnonzero(lengths == n))) for n in set(lengths)}
    out = []
    for n in rng.permutation(lengths[chosen]):
        free = [m for m, p in pools.items() if p]
        m = min(free, key=lambda x: (abs(x - int(n)), x))
        out.append(pools[m].pop())
    return np.sort(np.asarray(out, dtype=np.int64))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished experiment run folder (with resolved.yaml)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the draw")
    a = ap.parse_args()
    run = Path(a.run)
    wired = yaml.safe_load((run / "resolved.yaml").read_text())
    ds = load_dataset(wired["finetune"]["data"])
    lengths = np.array([len(s) for s in ds.train])
    chosen = np.load(run / "selected.npy")
    out = run.with_name(run.name + "-lengthmatched")
    out.mkdir(exist_ok=True)
    selected = length_matched(lengths, chosen, a.seed)
    save_scores(
        out / "selected.npy",
        selected,
        kind="selection",
        dataset=ds.fingerprint(),
        options={"method": "length-matched random", "matches": str(run / "selected.npy")},
        seed=a.seed,
    )
    w = {s: dict(wired[s]) for s in ("finetune", "evaluate")}
    w["finetune"].update(selection=str(out / "selected.npy"), out=str(out / "adapter"))
    w["evaluate"].update(adapter=str(out / "adapter"), out=str(out / "metrics.json"))
    seconds = run_stages(["finetune", "evaluate"], w, out, RunLog(out / "run.log"))
    metrics = json.loads((out / "metrics.json").read_text())
    summary = {
        "run": str(run),
        "seed": a.seed,
        "mean_length": [float(lengths[chosen].mean()), float(lengths[selected].mean())],
        "shared_users": int(np.intersect1d(chosen, selected).size),
        "seconds": seconds,
        **{k: v for k, v in metrics.items() if "@" in k},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
