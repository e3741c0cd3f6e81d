"""Buffer donation, side by side in one process: the surrogate's training step and the
influence stage's mean-gradient batch, each as the project jits it (donated) and as a plain
``jax.jit`` of the same function (a copy of every parameter- and Adam-sized buffer per call).

Runs on a ``bench/scale.py`` folder (``runs/scale/xK``: ``data/`` and the trained ``run/``),
in alternation (plain, donated, plain, donated) over the same batches, and prints ms per call
and the last loss (equal for both: donation changes where results are written, not them).

    python bench/donation.py runs/scale/x16 --batches 20 --mean-grad-batches 60
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed_steps(run_dir: str, data_dir: str, n: int) -> None:
    """ms per training step (SASRec default, Adam), plain vs donated."""
    import optax

    from jaxrec import train as T
    from jaxrec.config import SurrogateConfig
    from jaxrec.data import load_dataset, training_arrays
    from jaxrec.models import sasrec

    cfg = SurrogateConfig(data=data_dir, out=run_dir, epochs=1)
    ds = load_dataset(data_dir)
    model, opt = T.build_model(cfg, ds.n_items), optax.adam(cfg.lr)
    donated = T.make_train_step(model, opt)
    plain = jax.jit(donated.__wrapped__)
    data = T.training_data(cfg, training_arrays(ds, cfg.max_len), ds, 1)
    rng = np.random.default_rng(0)
    batches = [
        (T.take_batch(data, rows, width), (rows >= 0).astype(np.float32))
        for rows, width in itertools.islice(
            T.epoch_batches(T.target_lengths(data), cfg.batch_size, cfg.max_len, rng, cfg.batching),
            n + 1,
        )
    ]
    for name, step in [("plain", plain), ("donated", donated)] * 2:
        params = sasrec.init_params(model, jax.random.PRNGKey(0))
        state, key = opt.init(params), jax.random.PRNGKey(1)
        params, state, value = step(params, state, *batches[0], key)  # compile
        jax.block_until_ready(params)
        t = time.perf_counter()
        for batch, weights in batches[1:]:
            params, state, value = step(params, state, batch, weights, key)
        jax.block_until_ready(params)
        ms = (time.perf_counter() - t) / (len(batches) - 1) * 1e3
        print(f"train step, {name}: {ms:.1f} ms, last loss {float(value):.6f}", flush=True)


def timed_mean_gradient(run_dir: str, n: int, draws: int = 32) -> None:
    """ms per mean-gradient batch (``dealrec influence``'s default K-draw batches), plain vs
    donated accumulator."""
    from jaxrec.influence.batching import data_mesh, replicate, strata_batches
    from jaxrec.data.buckets import width_strata
    from jaxrec.influence.dealrec import draw_mean_losses, draw_parts
    from jaxrec.influence.scores import _grad_sum_fn
    from jaxrec.train import load_surrogate, negative_draw

    sur = load_surrogate(run_dir)
    order, parts = width_strata(sur.data, sur.config.max_len)
    draw = negative_draw(sur.config, sur.data, sur.dataset)
    parts = draw_parts(order, parts, draw, list(range(draws)))
    _, psl = draw_mean_losses(sur.per_sample_loss)
    mesh = data_mesh()
    params = replicate(sur.params, mesh)
    donated = _grad_sum_fn(psl)
    plain = jax.jit(donated.__wrapped__)
    batches = list(
        itertools.islice(
            strata_batches(parts, 4096 // draws, mesh, desc="mean gradient", progress=False), n + 1
        )
    )
    for name, grad_sum in [("plain", plain), ("donated", donated)] * 2:
        acc = jax.tree.map(jnp.zeros_like, params)
        acc = grad_sum(params, batches[0][1], batches[0][2], acc)  # compile
        jax.block_until_ready(acc)
        t = time.perf_counter()
        for _, batch, weight in batches[1:]:
            acc = grad_sum(params, batch, weight, acc)
        jax.block_until_ready(acc)
        ms = (time.perf_counter() - t) / (len(batches) - 1) * 1e3
        print(f"mean-gradient batch, {name}: {ms:.1f} ms", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a bench/scale.py folder, e.g. runs/scale/x16")
    ap.add_argument("--batches", type=int, default=20, help="training steps timed")
    ap.add_argument("--mean-grad-batches", type=int, default=60)
    a = ap.parse_args()
    timed_steps(f"{a.folder}/run", f"{a.folder}/data", a.batches)
    timed_mean_gradient(f"{a.folder}/run", a.mean_grad_batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
