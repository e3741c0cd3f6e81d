"""Benchmark: one TIGER fine-tune epoch with the greedy chunk cut (``chunking: tokens``)
against the cost cut (``chunking: cost``), interleaved, on a real selection.

The T5 of :mod:`llm_bridge.tiger.model` (TIGER's sizes, init seed 0), AdamW + cosine as
``dealrec finetune --backend tiger`` builds them, ``--autocast`` and fast dropout as given, one
epoch of :func:`llm_bridge.tiger.finetune.train_epoch` (batch 256, epoch-1 order of seed 0) over
the selection's samples; the two cuts alternate for ``--rounds`` rounds, each with a fresh
model. Reports CPU seconds (``time.process_time``) and the padded input tokens of each cut.

Usage::

    DEALREC_TORCH_THREADS=1 OMP_NUM_THREADS=1 python bench/tiger_chunking.py \\
        --semantic-ids SID --selection SEL [--data ../shared/data/games] [--rounds 3] \\
        [--autocast bf16] [--out runs/bench_tiger_chunking.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from jaxrec.data import load_dataset, load_scores
from jaxrec.data.scorefiles import environment
from llm_bridge.config import FinetuneConfig
from llm_bridge.tiger import finetune as F
from llm_bridge.tiger.dropout import use_fast_dropout
from llm_bridge.tiger.model import build_model, item_tokens, user_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/games")
    ap.add_argument("--semantic-ids", required=True)
    ap.add_argument("--selection", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--autocast", default="bf16")
    ap.add_argument("--out", default="runs/bench_tiger_chunking.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(a.data)
    codes, sizes = F.load_codes(a.semantic_ids, ds)
    sel, _ = load_scores(a.selection, kind="selection", dataset=ds.fingerprint())
    inputs, targets, _ = user_samples(ds, sel, item_tokens(codes, sizes), 20, "train")
    order = np.random.default_rng([0, 1]).permutation(len(inputs))
    batches = [order[i : i + 256] for i in range(0, len(order), 256)]
    padded = {
        name: int(
            sum(len(c) * max(len(inputs[r]) for r in c) for b in batches for c in cut(b, inputs))
        )
        for name, cut in F.CHUNKINGS.items()
    }
    cfg = FinetuneConfig(lr=1e-3, weight_decay=0.01, schedule="cosine", batch_size=256)
    times: dict[str, list[float]] = {name: [] for name in F.CHUNKINGS}
    for _ in range(a.rounds):
        for name in F.CHUNKINGS:
            model = build_model(sizes, 0, "cpu")
            use_fast_dropout(model)
            opt, sched = F.make_optimizer(model, cfg, 1000)
            t = time.process_time()
            F.train_epoch(model, inputs, targets, order, opt, sched, 256, 1, a.autocast, name)
            times[name].append(round(time.process_time() - t, 2))
            print(name, times[name][-1], flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "n_samples": len(inputs),
        "real_tokens": int(sum(len(x) for x in inputs)),
        "padded_tokens": padded,
        "cpu_seconds": times,
        "autocast": a.autocast,
        "environment": environment(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
