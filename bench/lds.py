"""Linear datamodeling score (LDS) of influence approximations on the SASRec surrogate.

    python bench/lds.py --data ../shared/data/games --users 1000 --subsets 16 --epochs 15

1. Take a seeded slice of users and train the surrogate on all of them (fixed epochs, no early
   stopping, so every retrain follows the same recipe).
2. Attribute the validation loss to each training user i with
   * ``lissa``: ``a_i = g_val . H^-1 g_i`` by LiSSA (the paper's recursion and defaults);
   * ``cg``: the same system solved by conjugate gradient (the same effective damping
     0.25: the surrogate's Hessian is indefinite, so a smaller damping breaks CG);
   * ``grad-dot``: ``a_i = g_val . g_i`` (no Hessian);
   * ``dealrec``: the paper's own score ``g_i . H^-1 g_mean / n^2`` (LiSSA), which targets the
     training risk, shown for reference.
   ``g_val`` is the gradient of the mean validation loss (each user's valid items as next-item
   targets after their train history).
3. Draw M random 50% subsets S, retrain from the same initialisation on each, and measure the
   validation loss. Removing users with a large positive ``a_i`` (they push the validation loss
   down when up-weighted) should raise it, so the prediction for S is ``-sum_{i in S} a_i`` and
   LDS is the Spearman correlation between prediction and measured loss over the M subsets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from jaxrec.config import SurrogateConfig
from jaxrec.data import load_dataset, training_arrays
from jaxrec.data.subset import write_user_subset
from jaxrec.influence import inverse_hvp, mean_gradient, sample_scores
from jaxrec.data.buckets import width_strata
from jaxrec.models import sasrec
from jaxrec.train import build_model, epoch_batches, make_train_step, take_batch, with_negatives


def valid_batch(ds, max_len: int) -> dict:
    """Next-item samples whose targets are the users' valid items (train targets masked)."""
    rows = [u for u in range(ds.n_users) if len(ds.valid[u]) and len(ds.train[u])]
    inputs = np.zeros((len(rows), max_len), np.int32)
    targets = np.zeros_like(inputs)
    for r, u in enumerate(rows):
        seq = np.concatenate([ds.train[u], ds.valid[u]])[-(max_len + 1) :]
        n_valid = min(len(ds.valid[u]), len(seq) - 1)
        inputs[r, max_len - len(seq) + 1 :] = seq[:-1]
        targets[r, max_len - n_valid :] = seq[-n_valid:]
    arrays = {"inputs": inputs, "targets": targets, "index": np.arange(len(rows), dtype=np.int32)}
    return with_negatives(arrays, 12345, 0, ds.n_items)


def fit(model, arrays, rows, epochs, seed, lr=1e-3, batch_size=128):
    """Train from the seed's initialisation on ``rows`` only, for a fixed number of epochs."""
    params = sasrec.init_params(model, jax.random.PRNGKey(seed))
    opt = optax.adam(lr)
    state = opt.init(params)
    step = make_train_step(model, opt)
    lengths = (arrays["targets"] > 0).sum(1)
    mask = np.zeros(len(lengths), bool)
    mask[rows] = True
    rng, key = np.random.default_rng(seed), jax.random.PRNGKey(seed + 1)
    for epoch in range(1, epochs + 1):
        data = with_negatives(arrays, seed, epoch, model.n_items)
        for batch_rows, width in epoch_batches(
            np.where(mask, lengths, 0), batch_size, model.max_len, rng
        ):
            key, sub = jax.random.split(key)
            params, state, _ = step(
                params,
                state,
                take_batch(data, batch_rows, width),
                (batch_rows >= 0).astype(np.float32),
                sub,
            )
    return params


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/games")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--subsets", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="lds_")
    full = load_dataset(a.data)
    ds = load_dataset(
        write_user_subset(full, f"{tmp}/data", n_users=min(a.users, full.n_users), seed=a.seed)
    )
    cfg = SurrogateConfig(data=str(ds.path), dropout=0.2)
    model = build_model(cfg, ds.n_items)
    arrays = training_arrays(ds, cfg.max_len)
    n = ds.n_users
    params = fit(model, arrays, np.arange(n), a.epochs, a.seed)
    loss, per_sample = sasrec.make_loss_fns(model)
    train_data = with_negatives(arrays, cfg.seed, 0, ds.n_items)
    order, parts = width_strata(train_data, cfg.max_len)
    vb = {k: jnp.asarray(v) for k, v in valid_batch(ds, cfg.max_len).items() if k != "index"}
    g_val = jax.grad(loss)(params, vb)
    g_mean = mean_gradient(per_sample, params, parts)

    def scores_along(u):
        s = np.empty(n)
        s[order] = sample_scores(per_sample, params, parts, u)
        return s

    lissa_opts = dict(
        solver="lissa", damping=0.01, convention="dealrec", scale=25.0, steps=2000, batch_size=16
    )
    attributions = {
        "lissa": scores_along(inverse_hvp(loss, params, parts, g_val, **lissa_opts)),
        "cg": scores_along(
            inverse_hvp(
                loss,
                params,
                parts,
                g_val,
                solver="cg",
                damping=0.01,
                convention="dealrec",
                scale=25.0,
                maxiter=200,
                tol=1e-6,
            )
        ),
        "grad-dot": scores_along(g_val),
        "dealrec": scores_along(inverse_hvp(loss, params, parts, g_mean, **lissa_opts)) / n**2,
    }
    rng = np.random.default_rng(a.seed + 100)
    measured, subsets = [], []
    for m in range(a.subsets):
        rows = np.sort(rng.choice(n, n // 2, replace=False))
        p_s = fit(model, arrays, rows, a.epochs, a.seed)
        measured.append(float(loss(p_s, vb)))
        subsets.append(rows)
        print(f"subset {m + 1}/{a.subsets}: valid loss {measured[-1]:.5f}", flush=True)
    result = {
        "users": n,
        "valid_users": int(vb["inputs"].shape[0]),
        "subsets": a.subsets,
        "epochs": a.epochs,
        "seconds": None,
        "lds": {},
    }
    for name, attr in attributions.items():
        pred = [-attr[rows].sum() for rows in subsets]
        result["lds"][name] = round(float(stats.spearmanr(pred, measured).statistic), 4)
    # How far the Hessian term moves each attribution away from plain gradient-dot, per user.
    result["spearman_vs_grad_dot"] = {
        name: round(float(stats.spearmanr(attr, attributions["grad-dot"]).statistic), 4)
        for name, attr in attributions.items()
        if name != "grad-dot"
    }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
