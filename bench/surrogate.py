"""Benchmark: seconds per SASRec training epoch on Games (target <= 30 s on a 2-core CPU,
<= 1 s on an H100; the paper's PyTorch code takes about 66 s per epoch on the 2-core CPU).

    python bench/surrogate.py --data ../shared/data/games --epochs 4

Prints the per-epoch seconds (the first includes jit compilation) and the steady-state median.
With --full it trains to early stopping and prints the test metrics too. ``--model`` picks the
surrogate (jaxrec.models); ``--eval-every N`` evaluates valid only every N epochs, so a fixed
budget of ``--epochs`` reports the model of the last epoch (the surrogate comparison of
docs/benchmarks.md: ``--model M --epochs 10 --eval-every 10`` for each M).
"""

import argparse
import json
import platform
import tempfile
import time

import jax

from jaxrec.config import SurrogateConfig
from jaxrec.train import train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/games")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--full", action="store_true", help="train to early stopping (200 epochs max)")
    p.add_argument("--out", default="")
    p.add_argument("--model", default="sasrec", help="sasrec, gru4rec, bert4rec or dcrec")
    p.add_argument("--eval-every", type=int, default=1)
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="bench_surrogate_")
    cfg = SurrogateConfig(
        data=a.data,
        out=out,
        model=a.model,
        eval_every=a.eval_every,
        epochs=200 if a.full else a.epochs,
        patience=10 if a.full else 1000,
        resume=False,
    )
    t0 = time.perf_counter()
    metrics = train(cfg, progress=False)
    total = time.perf_counter() - t0
    state = json.load(open(f"{out}/train_state.json"))
    per_epoch = [h["seconds"] for h in state["history"]]
    print(
        json.dumps(
            {
                "model": a.model,
                "device": str(jax.devices()[0]),
                "machine": platform.processor() or platform.machine(),
                "epoch_seconds": per_epoch,
                "steady_median_s": metrics["seconds_per_epoch"],
                "wall_s": round(total, 1),
                "best_epoch": metrics["best_epoch"],
                "test": metrics["test"],
                "valid": metrics["valid"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
