"""Benchmark: one TIGER fine-tune epoch with 1 and with 2 torch threads, side by side.

The T5 of :mod:`llm_bridge.tiger.model` (TIGER's sizes, random initialisation), AdamW + cosine
as ``dealrec finetune --backend tiger`` builds them, one epoch of
:func:`llm_bridge.tiger.finetune.train_epoch` (batch 256) over ``--users`` seeded random Games
users, with random item codes (``[256, 256, 256, 8]``; the codes do not change the cost).
The thread counts alternate (1, 2, 1, 2, ...) for ``--rounds`` rounds, each with a fresh model,
so that both see the same machine load. It decides ``DEALREC_TORCH_THREADS`` for a long
fine-tune: on a quiet 2-core machine two threads were 1.5x faster; under load one thread was
faster (docs/benchmarks.md).

Usage::

    python bench/tiger_threads.py [--data ../shared/data/games] [--users 4096] [--rounds 2]
        [--out runs/bench_tiger_threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from jaxrec.data import load_dataset
from jaxrec.data.scorefiles import environment
from llm_bridge.config import FinetuneConfig
from llm_bridge.tiger.finetune import make_optimizer, train_epoch
from llm_bridge.tiger.model import build_model, item_tokens, user_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/games")
    ap.add_argument("--users", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_tiger_threads.json")
    args = ap.parse_args()

    ds = load_dataset(args.data)
    rng = np.random.default_rng(0)
    codes = np.stack(
        [*(rng.integers(0, 256, ds.n_items) for _ in range(3)), np.zeros(ds.n_items, int)], 1
    )
    sizes = [256, 256, 256, 8]
    rows = rng.choice(ds.n_users, args.users, replace=False)
    train = user_samples(ds, rows, item_tokens(codes, sizes), 20, "train")[:2]
    cfg = FinetuneConfig(lr=1e-3, weight_decay=0.01, schedule="cosine", batch_size=256)
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = build_model(sizes, 0, "cpu")
            opt, sched = make_optimizer(model, cfg, 1000)
            t = time.perf_counter()
            train_epoch(model, *train, np.arange(len(train[0])), opt, sched, 256, 1)
            times[threads].append(round(time.perf_counter() - t, 2))
            print(f"{threads} thread(s): {times[threads][-1]} s for {args.users} users", flush=True)
    result = {
        "users": args.users,
        "seconds": {f"{k}_threads": v for k, v in times.items()},
        "speedup_2_over_1": round(float(np.mean(times[1]) / np.mean(times[2])), 2),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
