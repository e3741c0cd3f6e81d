"""Vmapped LDS retraining (jaxrec.retrain.retrain_many) against the one-at-a-time
jaxrec.retrain.retrain."""

import time

import jax
import numpy as np

from jaxrec import lds, retrain
from jaxrec.config import SurrogateConfig
from jaxrec.data import load_dataset
from jaxrec.retrain import retrain_many, valid_losses_many


def test_vmapped_retrains_equal_one_at_a_time(tmp_path):
    from jaxrec.data.synthetic import make_synthetic

    ds = load_dataset(make_synthetic(tmp_path / "data", n_users=40, n_items=30, seed=0))
    cfg = SurrogateConfig(
        data=str(ds.path), hidden=8, max_len=12, dropout=0.2, batch_size=16, epochs=2, seed=3
    )
    task = retrain.surrogate_task(cfg, ds)
    masks = lds.draw_subsets(ds.n_users, 3, 0.5, seed=1)
    seeds = [0, 1, 0]
    t0 = time.perf_counter()
    stacked = retrain_many(task, masks, seeds)
    t1 = time.perf_counter()
    one = [retrain.retrain(task, mask, s) for mask, s in zip(masks, seeds)]
    t2 = time.perf_counter()
    print(f"\nvmapped {t1 - t0:.1f} s, one at a time {t2 - t1:.1f} s (3 models, compile included)")
    for m, params in enumerate(one):
        got = jax.tree.map(lambda x, m=m: np.asarray(x[m]), stacked)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5)
    want = np.stack([retrain.valid_losses(task, p) for p in one])
    np.testing.assert_allclose(valid_losses_many(task, stacked), want, rtol=1e-4, atol=1e-5)
    # the models differ (masks and seeds matter): the test can fail
    assert np.abs(want[0] - want[1]).max() > 1e-3 and np.abs(want[0] - want[2]).max() > 1e-3


def test_scanned_retrain_equals_one_step_at_a_time(tmp_path):
    """retrain_scan (each epoch one lax.scan, padded with no-op steps) trains the model of
    retrain: same batches, widths, negatives and dropout keys."""
    from jaxrec.data.synthetic import make_synthetic

    ds = load_dataset(make_synthetic(tmp_path / "data", n_users=40, n_items=30, seed=0))
    cfg = SurrogateConfig(
        data=str(ds.path), hidden=8, max_len=12, dropout=0.2, batch_size=16, epochs=2, seed=3
    )
    task = retrain.surrogate_task(cfg, ds)
    masks = lds.draw_subsets(ds.n_users, 2, 0.5, seed=1)
    got = [retrain.retrain_scan(task, mask, s, pad_to=4) for mask, s in zip(masks, [0, 1])]
    want = [retrain.retrain(task, mask, s) for mask, s in zip(masks, [0, 1])]
    for g, w in zip(got, want):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    diff = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for g, w in zip(got, want)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w))
    )
    print(f"\nlargest difference to retrain: {diff:.2e}")
    # the two models differ (mask and seed matter): the comparison can fail
    a, b = (retrain.valid_losses(task, p) for p in want)
    assert np.abs(a - b).max() > 1e-3
