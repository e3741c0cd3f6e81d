"""LDS retraining, side by side in one run: one retrain at a time (jaxrec.retrain.retrain, the
study's path), each epoch one jitted lax.scan (jaxrec.retrain.retrain_scan) and many models in
one vmapped step (jaxrec.retrain.retrain_many); each path compiled by a first run, then timed
on the same subsets and seeds (wall and CPU seconds of this process: on a shared machine the
wall time is noisy, the CPU seconds less so).

``--step-widths`` adds the best case of a stacked step: one width for every model, no idle
slot and no mask (every model its own full batch), against the same single-model step, per
model-step (what per-model gathered, equal-width batches could at most gain).

    python bench/retrain_vmap.py [--users 300] [--models 8] [--epochs 2] [--hidden 64]
    python bench/retrain_vmap.py --data ../shared/data/games --users 600 --models 8 \\
        --epochs 2 --step-widths 8 50      # the LDS study's slice (dealrec lds defaults)
"""

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec import lds, retrain
from jaxrec.config import SurrogateConfig
from jaxrec.data import load_dataset
from jaxrec.data.subset import write_user_subset
from jaxrec.data.synthetic import make_synthetic
from jaxrec.models.sasrec import positions_per_sample
from jaxrec.retrain import retrain_many
from jaxrec.train import take_batch, train_step_fn


def clocked(fn, into=None):
    """``(wall s, CPU s)`` of ``fn()`` (blocked until its result is ready; appended to
    ``into`` where given)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = jax.block_until_ready(fn())
    if into is not None:
        into.append(value)
    return time.perf_counter() - wall, time.process_time() - cpu


def largest_difference(models, stacked_or_list) -> float:
    """The largest absolute difference of any parameter between ``models`` (a list of trees)
    and ``stacked_or_list`` (the same list, or one tree stacked along a model axis)."""
    if not isinstance(stacked_or_list, list):
        stacked_or_list = [
            jax.tree.map(lambda x, m=m: x[m], stacked_or_list) for m in range(len(models))
        ]
    return max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for x, y in zip(models, stacked_or_list)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def step_widths(task, widths, models, repeats=5):
    """CPU ms per model-step: the single-model step against one vmapped step over ``models``
    models at one width (no idle slot, no mask)."""
    cfg = task.cfg
    opt = optax.adam(cfg.lr)
    raw = train_step_fn(
        task.model, opt, cfg.loss_weighting, float(positions_per_sample(task.arrays["targets"]))
    )
    single, many = jax.jit(raw), jax.jit(jax.vmap(raw))
    params = task.init_params(task.model, jax.random.PRNGKey(0))
    state = opt.init(params)
    stack = jax.tree.map(lambda x: jnp.stack([x] * models), params)
    stack_state = jax.vmap(opt.init)(stack)
    keys = jax.random.split(jax.random.PRNGKey(1), models)
    rows = np.arange(cfg.batch_size) % len(task.train_data["targets"])
    for w in widths:
        batch = take_batch(task.train_data, rows, w)
        weights = np.ones(cfg.batch_size, np.float32)
        stacked = {k: np.stack([v] * models) for k, v in batch.items()}
        stacked_w = np.stack([weights] * models)
        one = partial(single, params, state, batch, weights, keys[0])
        all_ = partial(many, stack, stack_state, stacked, stacked_w, keys)
        clocked(one), clocked(all_)  # compile
        t1 = sum(clocked(one)[1] for _ in range(repeats)) / repeats
        tm = sum(clocked(all_)[1] for _ in range(repeats)) / repeats / models
        print(
            f"step width {w}: single {t1 * 1e3:.1f} CPU ms, vmapped x{models} "
            f"{tm * 1e3:.1f} CPU ms per model (single / vmapped {t1 / tm:.2f}x)"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a dataset folder (default: a synthetic one)")
    ap.add_argument("--users", type=int, default=300, help="users (a seeded slice of --data)")
    ap.add_argument("--items", type=int, default=120, help="items of the synthetic data")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--paths", nargs="+", default=["one", "scan", "vmap"])
    ap.add_argument("--step-widths", type=int, nargs="*", default=[])
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            full = load_dataset(args.data)
            write_user_subset(full, Path(tmp), n_users=args.users, seed=0)
            ds = load_dataset(tmp)
        else:
            ds = load_dataset(make_synthetic(Path(tmp), n_users=args.users, n_items=args.items))
        cfg = SurrogateConfig(
            data=str(ds.path),
            hidden=args.hidden,
            dropout=0.2,
            batch_size=args.batch_size,
            epochs=args.epochs,
            max_len=args.max_len,
        )
        task = retrain.surrogate_task(cfg, ds)
        # the LDS study's subsets (dealrec lds: alpha 0.5, seed + 100) and seeds 0, 1
        masks = lds.draw_subsets(ds.n_users, max(args.models, 2), 0.5, seed=100)[: args.models]
        seeds = [m % 2 for m in range(args.models)]
        paths = {
            "one": lambda: [retrain.retrain(task, m, s) for m, s in zip(masks, seeds)],
            "scan": lambda: [retrain.retrain_scan(task, m, s) for m, s in zip(masks, seeds)],
            "vmap": lambda: retrain_many(task, masks, seeds),
        }
        warm = {
            "one": lambda: retrain.retrain(task, masks[0], 0),
            "scan": lambda: retrain.retrain_scan(task, masks[0], 0),
            "vmap": lambda: retrain_many(task, masks[:1].repeat(args.models, 0), seeds),
        }
        times, results = {}, {}
        for name in args.paths:
            compile_s = clocked(warm[name])
            got: list = []
            times[name] = clocked(paths[name], got)
            results[name] = got[0]
            print(
                f"{name}: {times[name][0]:.1f} s wall, {times[name][1]:.1f} CPU s "
                f"(warm-up with compilation {compile_s[0]:.1f} s wall)",
                flush=True,
            )
        print(
            f"{args.models} models, {ds.n_users} users ({ds.n_items} items), {args.epochs} "
            f"epochs, hidden {args.hidden}, batch {args.batch_size}:"
        )
        if "one" in times:
            for name, (wall, cpu) in times.items():
                diff = largest_difference(results["one"], results[name])
                print(
                    f"  {name}: one-at-a-time / {name} = {times['one'][0] / wall:.2f}x wall, "
                    f"{times['one'][1] / cpu:.2f}x CPU; largest parameter difference to "
                    f"one-at-a-time {diff:.1e}"
                )
        if args.step_widths:
            step_widths(task, args.step_widths, args.models)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
