"""Benchmark: the surrogate's learning curve, epoch for epoch, against the paper's code.

    # one curve per variant of this project's trainer (valid and test metrics every epoch)
    python bench/surrogate_curve.py run --name official --arch official --negatives sequence \\
        --loss-weighting position --epochs 20 --json /tmp/curves/official.json
    # the paper's code: bench/paper_surrogate.py (its JSON has the same layout)
    # table + plot of several curves
    python bench/surrogate_curve.py plot /tmp/curves/*.json --out docs/figures/surrogate_curve

``run`` is the loop of :func:`jaxrec.train.train` (same seeding, batches, steps) without early
stopping or checkpoints, evaluating valid **and test** after every epoch. ``plot`` writes
``OUT.json`` (all curves) and ``OUT.png`` (valid Recall@20 per epoch), and prints a Markdown
table: test Recall/NDCG@20 at epoch 10 and at the best valid epoch, and seconds per epoch
(median; training only, evaluation excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np


def run(a) -> None:
    import jax
    import optax

    from jaxrec.config import SurrogateConfig
    from jaxrec.data import load_dataset, training_arrays
    from jaxrec.models import sasrec
    from jaxrec.train import (
        train_epoch,
        build_model,
        evaluate,
        make_train_step,
        training_data,
    )

    cfg = SurrogateConfig(
        data=a.data,
        arch=a.arch,
        negatives=a.negatives,
        loss_weighting=a.loss_weighting,
        batching=a.batching,
        seed=a.seed,
        epochs=a.epochs,
    )
    ds = load_dataset(cfg.data)
    model = build_model(cfg, ds.n_items)
    optimizer = optax.adam(cfg.lr)
    params = sasrec.init_params(model, jax.random.PRNGKey(cfg.seed))
    opt_state = optimizer.init(params)
    arrays = training_arrays(ds, cfg.max_len)
    positions = sasrec.positions_per_sample(arrays["targets"])
    step = make_train_step(model, optimizer, cfg.loss_weighting, positions)
    rng = np.random.default_rng([cfg.seed, 0])
    key = jax.random.PRNGKey(cfg.seed + 1)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        data = training_data(cfg, arrays, ds, epoch)
        params, opt_state, key, loss = train_epoch(step, params, opt_state, key, data, cfg, rng)
        seconds = time.perf_counter() - t0
        rec = {
            "epoch": epoch,
            "loss": loss,
            "seconds": round(seconds, 2),
            "valid": evaluate(model, params, ds, "valid", max_len=cfg.max_len),
            "test": evaluate(model, params, ds, "test", max_len=cfg.max_len),
        }
        history.append(rec)
        print(json.dumps(rec), flush=True)
        out = {
            "name": a.name,
            "source": "this project (bench/surrogate_curve.py run)",
            "config": dataclasses.asdict(cfg),
            "device": str(jax.devices()[0]),
            "machine": platform.machine(),
            "history": history,
        }
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))


def summary(curve: dict, at: int = 10) -> dict:
    """Test Recall/NDCG@20 at epoch ``at`` and at the best valid Recall@20 epoch; median
    seconds per epoch (the first epoch excluded when there are more: jit compilation)."""
    hist = curve["history"]
    best = max(hist, key=lambda h: h["valid"]["recall@20"])
    at_rec = next((h for h in hist if h["epoch"] == at), None)
    secs = [h["seconds"] for h in hist]
    return {
        "name": curve["name"],
        "epochs": len(hist),
        "at": at_rec
        and {"recall@20": at_rec["test"]["recall@20"], "ndcg@20": at_rec["test"]["ndcg@20"]},
        "best_epoch": best["epoch"],
        "best": {"recall@20": best["test"]["recall@20"], "ndcg@20": best["test"]["ndcg@20"]},
        "best_valid_recall@20": best["valid"]["recall@20"],
        "seconds_per_epoch": float(np.median(secs[1:] if len(secs) > 1 else secs)),
    }


def plot(a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for path in a.curves:
        c = json.loads(Path(path).read_text())
        c.setdefault("name", Path(path).stem)
        curves.append(c)
    rows = [summary(c) for c in curves]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"curves": curves, "summary": rows}, indent=1))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for c in curves:
        h = c["history"]
        ax.plot(
            [r["epoch"] for r in h],
            [r["valid"]["recall@20"] for r in h],
            "o-",
            ms=3,
            label=c["name"],
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid Recall@20")
    ax.set_title("SASRec surrogate on Games: valid Recall@20 per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(
        "| run | test R@20 @10 | test N@20 @10 | best epoch | test R@20 best "
        "| test N@20 best | s/epoch |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        at = r["at"] or {"recall@20": float("nan"), "ndcg@20": float("nan")}
        print(
            f"| {r['name']} | {at['recall@20']:.4f} | {at['ndcg@20']:.4f} | {r['best_epoch']} "
            f"| {r['best']['recall@20']:.4f} | {r['best']['ndcg@20']:.4f} "
            f"| {r['seconds_per_epoch']:.1f} |"
        )


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--data", default="../shared/data/games")
    r.add_argument("--arch", default="official", choices=["official", "kang"])
    r.add_argument("--negatives", default="sequence", choices=["sequence", "target"])
    r.add_argument("--loss-weighting", default="position", choices=["position", "sample"])
    r.add_argument("--batching", default="bucketed", choices=["bucketed", "random"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--json", required=True)
    q = sub.add_parser("plot")
    q.add_argument("curves", nargs="+")
    q.add_argument("--out", default="docs/figures/surrogate_curve")
    a = p.parse_args()
    run(a) if a.cmd == "run" else plot(a)


if __name__ == "__main__":
    main()
