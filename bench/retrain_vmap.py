"""Vmapped LDS retraining (jaxrec.retrain.retrain_many) against one retrain at a time
(jaxrec.retrain.retrain), warm (each path compiled by a first run), on a synthetic dataset.

    python bench/retrain_vmap.py [--users 300] [--models 8] [--epochs 2] [--hidden 64]
"""

import argparse
import tempfile
import time
from pathlib import Path

import jax

from jaxrec import lds, retrain
from jaxrec.config import SurrogateConfig
from jaxrec.data import load_dataset
from jaxrec.data.synthetic import make_synthetic
from jaxrec.retrain import retrain_many


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--items", type=int, default=120)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset(make_synthetic(Path(tmp), n_users=args.users, n_items=args.items))
        cfg = SurrogateConfig(
            data=str(ds.path),
            hidden=args.hidden,
            dropout=0.2,
            batch_size=args.batch_size,
            epochs=args.epochs,
        )
        task = retrain.surrogate_task(cfg, ds)
        masks = lds.draw_subsets(ds.n_users, max(args.models, 2), 0.5, seed=1)[: args.models]
        seeds = [m % 2 for m in range(args.models)]
        retrain_many(task, masks[:1].repeat(args.models, 0), [0] * args.models)  # compile
        retrain.retrain(task, masks[0], 0)  # compile
        t = time.perf_counter()
        jax.block_until_ready(retrain_many(task, masks, seeds))
        vmapped = time.perf_counter() - t
        t = time.perf_counter()
        for mask, s in zip(masks, seeds):
            jax.block_until_ready(retrain.retrain(task, mask, s))
        one = time.perf_counter() - t
    print(
        f"{args.models} models, {args.users} users, {args.epochs} epochs, hidden {args.hidden}: "
        f"vmapped {vmapped:.1f} s, one at a time {one:.1f} s, speed-up {one / vmapped:.2f}x"
    )


if __name__ == "__main__":
    main()
