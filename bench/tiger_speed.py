"""Benchmark: one TIGER run (fine-tune + evaluate) with today's defaults against the speed
options, side by side on the same selection, one torch thread each.

Variants (each runs ``dealrec finetune --backend tiger`` then ``dealrec evaluate --backend
tiger`` as subprocesses, the options of ``configs/table2_tiger.yaml``):

* ``old``: the defaults (float32, torch dropout): today's results;
* ``new``: ``finetune --autocast bf16 --fast-dropout`` and ``evaluate --autocast bf16``;
* ``new-fp32-eval``: the ``new`` model evaluated in float32 (separates the two stages' shifts);
* ``fast``: every speed option: ``new`` plus ``finetune --chunking cost`` (the cheapest cut of
  each length-sorted batch into forward/backward chunks).

The variants run at the same time (``--parallel``, default) so that they share the machine's
load, or one after the other. Per stage: wall seconds and the CPU seconds of its process
(``os.wait4``), epochs, best epoch; per variant: Recall/NDCG@{10,20} and the test loss (mean of
the users' target losses) of ``dealrec evaluate``.

Usage::

    DEALREC_TORCH_THREADS=1 OMP_NUM_THREADS=1 nice -n 15 python bench/tiger_speed.py \\
        --semantic-ids runs/table2_tiger/semantic_ids.npy --selection SELECTED.npy \\
        [--data ../shared/data/games] [--epochs 200] [--eval-users 0] \\
        [--variants old,new,new-fp32-eval,fast] [--sequential] [--out runs/bench_tiger_speed]

``--epochs`` below 200 and ``--eval-users`` above 0 give a shorter run (a cosine over fewer
epochs, a seeded subsample of test users): a cheaper protocol, the same for every variant.
Results go to ``OUT/bench_tiger_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

FINETUNE = [
    "--backend", "tiger", "--patience", "5", "--lr", "0.001", "--weight-decay", "0.01",
    "--schedule", "cosine", "--batch-size", "256", "--grad-accum", "1", "--max-history", "20",
    "--no-resume",
]  # fmt: skip
EVALUATE = ["--backend", "tiger", "--split", "test", "--beams", "20", "--batch-size", "128",
            "--max-history", "20"]  # fmt: skip
VARIANTS = {  # name: (finetune flags, evaluate flags, model folder of)
    "old": ([], [], "old"),
    "new": (["--autocast", "bf16", "--fast-dropout"], ["--autocast", "bf16"], "new"),
    "new-fp32-eval": (None, [], "new"),
    "fast": (
        ["--autocast", "bf16", "--fast-dropout", "--chunking", "cost"],
        ["--autocast", "bf16"],
        "fast",
    ),
}


def run_stage(args: list[str], log: Path) -> dict:
    """One ``python -m jaxrec.cli`` subprocess: its wall and CPU seconds (``os.wait4``)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jaxrec.cli", *args], stdout=f, stderr=f)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:1])} failed (exit {proc.returncode}); see {log}")
    return {
        "wall_seconds": round(time.perf_counter() - t, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
    }


def run_variant(name: str, a, out: Path, results: dict) -> None:
    """Fine-tune (unless the variant reuses another's model), then evaluate."""
    ft_flags, ev_flags, model_of = VARIANTS[name]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model = out / model_of / "model"
    res: dict = {"finetune_flags": ft_flags, "evaluate_flags": ev_flags}
    if ft_flags is not None:
        res["finetune"] = run_stage(
            ["finetune", *FINETUNE, *ft_flags, "--data", a.data, "--semantic-ids",
             a.semantic_ids, "--selection", a.selection, "--epochs", str(a.epochs),
             "--out", str(model)],
            folder / "finetune.log",
        )  # fmt: skip
        rec = json.loads((model / "train_record.json").read_text())
        res["finetune"].update(
            epochs=len(rec["epochs"]),
            best_epoch=rec["best_epoch"],
            best_valid_loss=rec["best_valid_loss"],
            seconds_per_epoch=rec["seconds_per_epoch"],
            cpu_seconds_per_epoch=[e.get("cpu_seconds") for e in rec["epochs"]],
            train_loss=[round(e["train_loss"], 5) for e in rec["epochs"]],
            valid_loss=[round(e["valid_loss"], 5) for e in rec["epochs"]],
        )
    else:  # wait for the model of the variant it evaluates
        while not (model / "train_record.json").is_file():
            time.sleep(5)
    metrics = folder / "metrics.json"
    res["evaluate"] = run_stage(
        ["evaluate", *EVALUATE, *ev_flags, "--data", a.data, "--semantic-ids", a.semantic_ids,
         "--adapter", str(model), "--users", str(a.eval_users), "--out", str(metrics)],
        folder / "evaluate.log",
    )  # fmt: skip
    m = json.loads(metrics.read_text())
    losses = [json.loads(line)["loss"] for line in open(metrics.with_suffix(".predictions.jsonl"))]
    res["metrics"] = {
        **{k: m[k] for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")},
        "test_loss": float(np.mean(losses)),
        "n_users": m["n_users"],
    }
    res["top20"] = str(metrics.with_suffix(".predictions.jsonl"))
    results[name] = res
    print(name, json.dumps(res), flush=True)


def top_overlap(a: str, b: str) -> float:
    """Mean over users of |top-20(a) & top-20(b)| / 20."""
    pa = [json.loads(line)["top"] for line in open(a)]
    pb = [json.loads(line)["top"] for line in open(b)]
    return float(np.mean([len(set(x) & set(y)) / 20 for x, y in zip(pa, pb)]))


def speedup(old: dict, new: dict) -> dict:
    """Old over new seconds per stage (wall and CPU) and for the whole run (CPU)."""
    out = {
        f"{stage}_{kind}": round(old[stage][kind] / new[stage][kind], 2)
        for stage in ("finetune", "evaluate")
        for kind in ("wall_seconds", "cpu_seconds")
    }
    out["run_cpu_seconds"] = round(
        sum(old[s]["cpu_seconds"] for s in ("finetune", "evaluate"))
        / sum(new[s]["cpu_seconds"] for s in ("finetune", "evaluate")),
        2,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/games")
    ap.add_argument("--semantic-ids", required=True)
    ap.add_argument("--selection", required=True)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--eval-users", type=int, default=0)
    ap.add_argument("--variants", default="old,new,new-fp32-eval")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--out", default="runs/bench_tiger_speed")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.variants.split(",")
    results: dict = {}
    load_before, t0 = os.getloadavg(), time.perf_counter()
    if a.sequential:
        for name in names:
            run_variant(name, a, out, results)
    else:
        threads = [threading.Thread(target=run_variant, args=(n, a, out, results)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    summary = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": os.environ.get("DEALREC_TORCH_THREADS", "1"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "total_wall_seconds": round(time.perf_counter() - t0, 1),
        "variants": results,
    }
    for name in [n for n in names if n != "old" and "finetune" in results.get(n, {})]:
        if "old" in results:
            summary[f"speedup_{name}"] = speedup(results["old"], results[name])
    for name in [n for n in names if n != "old"]:
        if "old" in results and name in results:
            old, new = results["old"], results[name]
            summary[f"metric_shift_{name}_minus_old"] = {
                k: new["metrics"][k] - old["metrics"][k] for k in old["metrics"] if k != "n_users"
            }
            summary[f"top20_overlap_old_{name}"] = top_overlap(old["top20"], new["top20"])
    (out / "bench_tiger_speed.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
