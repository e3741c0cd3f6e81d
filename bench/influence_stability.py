"""Seed stability of the influence ranking (issue 10, section 4).

Influence scores (paper Eq. 11) depend on two random choices: the fixed draw of negatives the
loss is differentiated on (mean gradient, HVPs, per-sample scores) and LiSSA's minibatches.
This script scores every user of a trained surrogate several times in one process, varying one
choice at a time, and reports the Spearman correlation of the scores across seeds (every pair,
their mean and minimum) and the overlap of the top 10 % (the users DEALRec's hard pruning
drops), for:

* negative draws: ``--negative-seed`` 0, 1, 2 (K = 1) with LiSSA's seed fixed;
* LiSSA seeds: ``--seed`` 0, 1, 2 with the negatives fixed (K = 1);
* K = 4 negative draws: ``--negative-seed`` 0, 4, 8 (disjoint sets of 4 draws), LiSSA fixed.

    python bench/influence_stability.py --run /tmp/i10sel/sur --json /tmp/i10sel/stab.json
    python bench/influence_stability.py --run RUN --k 16 32 --lissa-k --batch-size 1024
    python bench/influence_stability.py --run RUN --cost 1 32     # seconds and peak RSS per K

Scores are written to ``--scores DIR`` (one ``.npy`` per setting) so a rerun can skip them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats


def pair_stats(runs: list[np.ndarray], top: float) -> dict:
    rhos, overlaps = [], []
    for a, b in itertools.combinations(runs, 2):
        rhos.append(float(stats.spearmanr(a, b)[0]))
        k = max(1, int(top * a.size))
        ta, tb = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
        overlaps.append(len(ta & tb) / k)
    return {
        "spearman": [round(r, 4) for r in rhos],
        "spearman_mean": round(float(np.mean(rhos)), 4),
        "spearman_min": round(float(np.min(rhos)), 4),
        "top_overlap": [round(o, 4) for o in overlaps],
        "top_overlap_mean": round(float(np.mean(overlaps)), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/games_surrogate")
    ap.add_argument("--params", default="", help="parameter regex (empty = all)")
    ap.add_argument("--scores", default="/tmp/influence_stability")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4], help="negative draws to test")
    ap.add_argument(
        "--lissa-k", type=int, nargs="*", default=None, help="K values with LiSSA-seed runs too"
    )
    ap.add_argument("--batch-size", type=int, default=4096, help="JVP / mean-gradient batch")
    ap.add_argument(
        "--cost",
        type=int,
        nargs="*",
        default=[],
        help="instead: time one run per K (ascending; with the peak RSS so far)",
    )
    ap.add_argument("--top", type=float, default=0.1, help="top fraction for the overlap")
    ap.add_argument("--cache", default="~/.cache/dealrec/jax", help="JAX compile cache")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from jaxrec.config import InfluenceConfig
    from jaxrec.influence.cli import compute, use_compile_cache
    from jaxrec.train import load_surrogate

    use_compile_cache(args.cache)

    sur = load_surrogate(args.run)
    folder = Path(args.scores)
    folder.mkdir(parents=True, exist_ok=True)
    seconds = {}

    def scores(k: int, neg: int, lissa: int) -> np.ndarray:
        name = f"k{k}_neg{neg}_lissa{lissa}" + (f"_{args.params}" if args.params else "")
        name = name.replace("^", "").replace("$", "").replace("/", "_")
        path = folder / f"{name}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        cfg = InfluenceConfig(
            run=args.run,
            params=args.params,
            negative_draws=k,
            negative_seed=neg,
            seed=lissa,
            batch_size=args.batch_size,
        )
        t = time.perf_counter()
        s, info = compute(cfg, sur, progress=False)
        seconds[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {seconds[name]} s, LiSSA steps {info['solver'].get('steps_run')}")
        np.save(path, s, allow_pickle=False)
        return s

    out = {"run": args.run, "n_users": sur.dataset.n_users, "params": args.params or "all"}
    if args.cost:
        import resource

        out["cost"] = {}
        for k in sorted(args.cost):
            cfg = InfluenceConfig(
                run=args.run, params=args.params, negative_draws=k, batch_size=args.batch_size
            )
            t = time.perf_counter()
            _, info = compute(cfg, sur, progress=False)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
            out["cost"][k] = {
                "seconds": round(time.perf_counter() - t, 1),
                "stages": {a: round(b, 1) for a, b in info["seconds"].items()},
                "peak_rss_gib_so_far": round(rss, 2),
            }
            print(f"K={k}:", out["cost"][k])
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return
    lissa_k = args.k if args.lissa_k is None else args.lissa_k
    for k in args.k:  # K draws per run; the 3 runs use disjoint draws (seeds 0.., k.., 2k..)
        out[f"negatives_k{k}"] = pair_stats([scores(k, s * k, 0) for s in (0, 1, 2)], args.top)
        print(f"negative draws, K={k}:", out[f"negatives_k{k}"])
        if k in lissa_k:
            out[f"lissa_k{k}"] = pair_stats([scores(k, 0, s) for s in (0, 1, 2)], args.top)
            print(f"LiSSA seeds, K={k}:", out[f"lissa_k{k}"])
    out["seconds"] = seconds
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
