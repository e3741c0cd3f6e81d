"""Benchmark of the influence stage on a trained SASRec (issue 2, "Speed").

Times, in one run: the whole stage (mean gradient + LiSSA steps + every user's score) for ALL
parameters; the paper's single 64x64 block (``^attn_out_1/kernel$``: the official code's
``item_encoder.layer.1.attention.dense.weight``, block 2's attention output projection); and
the straightforward way of scoring (a jitted per-sample ``jax.grad`` then a dot product, one
user at a time) on a subset of users, extrapolated per sample, side by side with the JVP
scoring of the same users.

    python bench/influence.py --run runs/games_surrogate [--steps 5000] [--loop-samples 300]
    python bench/influence.py --run RUN --only-blocks --also-block '^ffn_2_1/kernel$'

Compile time is included in every stage number (cold process; pass --cache DIR to use JAX's
persistent compilation cache and see warm numbers on a second run).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/games_surrogate")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--lissa-batch-size", type=int, default=16)
    ap.add_argument("--loop-samples", type=int, default=300)
    ap.add_argument("--block", default=r"^attn_out_1/kernel$")
    ap.add_argument(
        "--also-block", default="", help="a second block timed the same way, e.g. ^ffn_2_1/kernel$"
    )
    ap.add_argument(
        "--negative-draws", type=int, default=1, help="K negative draws (1: the rows' setting)"
    )
    ap.add_argument("--skip-block", action="store_true")
    ap.add_argument(
        "--only-blocks",
        action="store_true",
        help="time the block rows only (no all-parameter row, no loop)",
    )
    ap.add_argument("--cache", default="", help="JAX persistent compilation cache folder")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from jaxrec.config import InfluenceConfig, LissaOptions
    from jaxrec.influence import sample_scores
    from jaxrec.data.buckets import width_strata
    from jaxrec.influence.cli import compute
    from jaxrec.train import load_surrogate

    t = time.perf_counter()
    sur = load_surrogate(args.run)
    n = sur.dataset.n_users
    print(
        f"loaded {args.run}: {n} users, "
        f"{sum(x.size for x in jax.tree.leaves(sur.params))} parameters "
        f"({time.perf_counter() - t:.1f} s); devices: {jax.devices()}"
    )
    results = {"n_users": n, "steps": args.steps, "lissa_batch_size": args.lissa_batch_size}

    def stage(params_regex: str):
        cfg = InfluenceConfig(
            run=args.run,
            params=params_regex,
            lissa=LissaOptions(steps=args.steps, batch_size=args.lissa_batch_size),
            negative_draws=args.negative_draws,
        )
        t0 = time.perf_counter()
        scores, info = compute(cfg, sur, progress=False)
        total = time.perf_counter() - t0
        sec = {k: round(v, 2) for k, v in info["seconds"].items()}
        return (
            scores,
            info,
            dict(
                sec,
                total=round(total, 2),
                n_params=info["n_params"],
                lissa_steps_run=info["solver"].get("steps_run"),
                ms_per_lissa_step=round(
                    1000 * sec["solve"] / max(info["solver"].get("steps_run") or [args.steps]), 2
                ),
            ),
        )

    if not args.only_blocks:
        scores_all, info_all, results["all_parameters"] = stage("")
        print("all parameters:", results["all_parameters"])
    if not args.skip_block:
        _, _, results["block_64x64"] = stage(args.block)
        results["block_64x64"]["params"] = args.block
        print(f"64x64 block {args.block}:", results["block_64x64"])
    if args.also_block:
        _, _, results["also_block"] = stage(args.also_block)
        results["also_block"]["params"] = args.also_block
        print(f"block {args.also_block}:", results["also_block"])
    if args.only_blocks:
        if args.json:
            from jaxrec.data import write_json

            write_json(args.json, results)
        return

    # --- side by side: per-sample jax.grad loop vs one JVP per batch, same users, same u
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, args.loop_samples, replace=False))
    u = jax.tree.map(
        lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), sur.params
    )
    keys = ("inputs", "targets", "negatives")
    sub = {k: sur.data[k][rows] for k in keys}

    @jax.jit
    def grad_dot(params, one, u):
        g = jax.grad(lambda p: sur.per_sample_loss(p, one)[0])(params)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(u)))

    one = {k: jnp.asarray(sub[k][:1]) for k in keys}
    jax.block_until_ready(grad_dot(sur.params, one, u))  # compile outside the timing
    t0 = time.perf_counter()
    loop = np.array(
        [
            float(grad_dot(sur.params, {k: jnp.asarray(sub[k][i : i + 1]) for k in keys}, u))
            for i in range(rows.size)
        ]
    )
    loop_per = (time.perf_counter() - t0) / rows.size
    order, parts = width_strata(sub, sur.config.max_len)
    jvp = np.empty(rows.size)
    jvp_warm = sample_scores(sur.per_sample_loss, sur.params, parts, u, progress=False)  # compile
    t0 = time.perf_counter()
    jvp[order] = sample_scores(sur.per_sample_loss, sur.params, parts, u, progress=False)
    jvp_small = time.perf_counter() - t0
    del jvp_warm
    err = float(np.max(np.abs(loop - jvp)) / np.max(np.abs(loop)))
    scoring_all = results["all_parameters"]["scores"]
    stage_all = results["all_parameters"]["total"]
    results["loop_vs_jvp"] = {
        "loop_samples": int(rows.size),
        "loop_ms_per_sample": round(1000 * loop_per, 3),
        "loop_extrapolated_all_users_s": round(loop_per * n, 1),
        "jvp_same_users_s": round(jvp_small, 3),
        "jvp_all_users_s_incl_compile": scoring_all,
        "scoring_speedup_all_users": round(loop_per * n / scoring_all, 1),
        "stage_speedup_vs_loop_scoring": round(
            (stage_all - scoring_all + loop_per * n) / stage_all, 2
        ),
        "max_rel_diff_loop_vs_jvp": err,
    }
    print("per-sample grad loop vs JVP:", results["loop_vs_jvp"])
    if args.json:
        from jaxrec.data import write_json

        write_json(args.json, results)


if __name__ == "__main__":
    main()
