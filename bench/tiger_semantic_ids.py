"""Benchmark: TIGER item content embeddings and semantic IDs on full Games.

Measures, on a fresh cache folder:
  1. the all-MiniLM-L6-v2 content embeddings of every item (target <= 5 min on the 2-core CPU),
     and the cached second call;
  2. ``dealrec semantic-ids`` (``main``) for each method with the embeddings cached
     (target <= 10 min), with the collision rate, perplexity and usage per level, and the
     reconstruction MSE from the manifest.
Wall and CPU seconds are both printed: on a shared machine the wall time depends on the load.

Usage::

    nice -n 10 python bench/tiger_semantic_ids.py [--data ../shared/data/games]
        [--methods rqvae,rkmeans] [--epochs N] [--cache-dir DIR] [--out DIR] [--embed-threads N]
        [--precision float32|bfloat16]

``--methods ""`` times the embeddings only; ``cached_before: true`` means the cache folder
already held them (the first timing is then not a fresh computation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, *args, **kw):
    """``(result, wall seconds, CPU seconds of this process)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - w, time.process_time() - c


def bench_embeddings(ds, cache_dir: str, threads: int, precision: str) -> dict:
    """Fresh embeddings, then the cached call."""
    import torch

    from llm_bridge.tiger.content import item_embeddings

    if threads:
        torch.set_num_threads(threads)
    (emb, info), wall, cpu = timed(
        item_embeddings, ds, cache_dir=cache_dir, progress=True, precision=precision
    )
    (_, info2), wall2, _ = timed(
        item_embeddings, ds, cache_dir=cache_dir, progress=False, precision=precision
    )
    assert info2["cached"], "the second call should reuse the cache"
    return {
        "n_items": len(emb),
        "dim": emb.shape[1],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cached_wall_s": round(wall2, 2),
        "torch_threads": torch.get_num_threads(),
        "precision": precision,
        "cached_before": info["cached"],
    }


def bench_method(ds, method: str, args, out_dir: Path) -> dict:
    """``main`` for one method (embeddings already cached); the manifest's numbers."""
    from llm_bridge.config import SemanticIdConfig
    from llm_bridge.tiger.semantic_ids import load_semantic_ids, main

    cfg = SemanticIdConfig(
        data=args.data,
        out=str(out_dir / f"{method}.npy"),
        method=method,
        cache_dir=args.cache_dir,
        seed=0,
    )
    if args.epochs:
        cfg.epochs = args.epochs
    _, wall, cpu = timed(main, cfg)
    _, m = load_semantic_ids(cfg.out, ds)
    hist = m.get("training", {}).get("history", [])
    return {
        "method": method,
        "epochs": cfg.epochs if method == "rqvae" else None,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "fit_s": m["fit_seconds"],
        "codebook_sizes": m["codebook_sizes"],
        "collision_rate": m["collision_rate"],
        "max_collisions": m["max_collisions"],
        "perplexity": m["perplexity"],
        "usage": m["usage"],
        "reconstruction_mse": m["reconstruction_mse"],
        "recon_history": [hist[i] for i in range(0, len(hist), max(1, len(hist) // 10))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "games"))
    ap.add_argument("--methods", default="rqvae,rkmeans")
    ap.add_argument("--epochs", type=int, default=0, help="0 = SemanticIdConfig's default")
    ap.add_argument("--cache-dir", default="", help="default: a fresh temporary folder")
    ap.add_argument("--out", default="", help="where the ID files go (default: temporary)")
    ap.add_argument("--embed-threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--precision", default="float32", help="float32 | bfloat16 (embeddings)")
    args = ap.parse_args()

    from jaxrec.data import load_dataset

    tmp = tempfile.TemporaryDirectory(prefix="bench_tiger_")
    args.cache_dir = args.cache_dir or tmp.name
    out_dir = Path(args.out or tmp.name)
    ds = load_dataset(args.data)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; date {time.strftime('%Y-%m-%d %H:%M')}"
    )
    result = {
        "embeddings": bench_embeddings(ds, args.cache_dir, args.embed_threads, args.precision),
        "methods": [],
    }
    print("embeddings:", json.dumps(result["embeddings"]))
    for method in filter(None, args.methods.split(",")):
        row = bench_method(ds, method, args, out_dir)
        result["methods"].append(row)
        print(f"{method}:", json.dumps(row))
    result["load_average_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
