"""Benchmark: the TIGER backend's effort, fine-tune and evaluation on full Games.

Measures, each with wall and CPU seconds (on a shared machine the wall time depends on the load;
the load average is recorded before and after each part):
  1. ``effort``: Eq. 12 over all T5 parameters for every user (target <= 10 min), and side by
     side on the same sample of users, in the same run: the batched exact method, a batch-1
     autograd loop on the ``transformers`` module (target ratio >= 3x), the vmap(grad) reference,
     and the batched method with 2 torch threads instead of 1; the largest relative difference
     between the batched scores and the loop's;
  2. ``finetune``: ``dealrec finetune --backend tiger`` on 1,024 seeded random users to early
     stopping (target <= 10 min), for each ``--batch-sizes``;
  3. ``evaluate``: ``dealrec evaluate --backend tiger`` on all 8,696 test users, beam 20
     (target <= 10 min), and on a sample the beam search with and without the decoder cache.

Usage::

    nice -n 10 python bench/tiger.py [--data ../shared/data/games] [--semantic-ids FILE]
        [--parts effort-sample,finetune-chunks,finetune,evaluate,effort]
        [--sample 2048] [--beam-sample 256] [--batch-sizes 256]
        [--model DIR] [--out DIR]

``--model DIR`` evaluates an existing fine-tuned folder instead of the one ``finetune`` makes.
Parts run in the order given and add up in ``bench_tiger.json``; ``effort`` (all users) is
resumable by shard, so a killed run continues.

Without ``--semantic-ids`` the codes are random and unique, codebook sizes ``[256, 256, 256, c]``
(``c`` separates the few collisions of the first three), so the timings do not wait for an
RQ-VAE. Results go to ``OUT/bench_tiger.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, *args, **kw):
    """``(result, wall seconds, CPU seconds of this process)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, round(time.perf_counter() - w, 2), round(time.process_time() - c, 2)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def random_codes_file(ds, path: Path, seed: int = 0) -> Path:
    """Random unique codes ``[n_items, 4]`` (3 x 256 + a collision code) as a semantic-ID file."""
    from jaxrec.data import save_scores

    rng = np.random.default_rng(seed)
    head = rng.integers(0, 256, (ds.n_items, 3))
    _, group = np.unique(head, axis=0, return_inverse=True)
    last, seen = np.zeros(ds.n_items, dtype=np.int64), {}
    for i, g in enumerate(group.reshape(-1)):
        last[i] = seen.get(g, 0)
        seen[g] = last[i] + 1
    codes = np.concatenate([head, last[:, None]], 1)
    save_scores(
        path,
        codes,
        kind="semantic_ids",
        dataset=ds.fingerprint(),
        codebook_sizes=[256, 256, 256, int(last.max()) + 1],
        method="random (bench)",
    )
    return path


# ----------------------------------------------------------------------------- effort
def _vmap_scores(eff, model, inputs, targets):
    """The vmap(grad) reference over length-bucketed batches of 16."""
    import torch

    from llm_bridge.tiger.model import Spec, pad_inputs, params_of

    p, spec = params_of(model), Spec.of(model.config)
    for idx in eff.length_batches([len(x) for x in inputs], 16):
        ids, mask = pad_inputs([inputs[i] for i in idx])
        eff.vmap_grad_norms(p, spec, ids, mask, torch.as_tensor(targets[idx]))


def bench_effort_sample(ds, codes, sizes, n: int, batch_size: int, rounds: int = 1024) -> dict:
    """Batched vs batch-1 loop vs vmap vs batched on 2 threads, on the same ``n`` users,
    interleaved in rounds of ``rounds`` users (so that all see the same machine load); then the
    float64 loop on the 32 users where batched and float32 loop differ most."""
    import torch

    from llm_bridge.config import EffortConfig
    from llm_bridge.tiger import effort as eff
    from llm_bridge.tiger.model import build_model, item_tokens, user_samples

    rows = np.sort(np.random.default_rng(0).choice(ds.n_users, n, replace=False))
    inputs, targets, _ = user_samples(ds, rows, item_tokens(codes, sizes), EffortConfig.max_history)
    model = build_model(sizes, 0).eval()

    def batched(x, y):
        return eff.score_samples(model, x, y, batch_size=batch_size)

    methods = {
        "batched_1thread": (1, batched),
        "loop_batch1_1thread": (1, lambda x, y: eff.loop_grad_norms(model, x, y)),
        "vmap_grad_bs16_1thread": (1, lambda x, y: _vmap_scores(eff, model, x, y)),
        "batched_2threads": (2, batched),
    }
    times = {k: [0.0, 0.0] for k in methods}
    scores = {"batched_1thread": [], "loop_batch1_1thread": []}
    for start in range(0, n, rounds):
        x, y = inputs[start : start + rounds], targets[start : start + rounds]
        for name, (threads, fn) in methods.items():
            torch.set_num_threads(threads)
            res, wall, cpu = timed(fn, x, y)
            times[name] = [times[name][0] + wall, times[name][1] + cpu]
            if name in scores:
                scores[name].append(res)
    torch.set_num_threads(1)
    fast, loop = (np.concatenate(scores[k]) for k in scores)
    rel = np.abs(fast / loop - 1)
    worst = np.argsort(-rel)[:32]
    loop64 = eff.loop_grad_norms(model.double(), [inputs[i] for i in worst], targets[worst])
    (w_b, c_b), (w_l, c_l), (w_v, _) = (times[k] for k in list(methods)[:3])
    return {
        "n_users": n,
        "batch_size": batch_size,
        "rounds_of": rounds,
        **{k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in times.items()},
        "speedup_vs_loop_wall": round(w_l / w_b, 2),
        "speedup_vs_loop_cpu": round(c_l / c_b, 2),
        "speedup_vs_vmap_wall": round(w_v / w_b, 2),
        "max_rel_diff_vs_loop": float(rel.max()),
        "median_rel_diff_vs_loop": float(np.median(rel)),
        "worst32_loop32_vs_loop64": float(np.max(np.abs(loop[worst] / loop64 - 1))),
        "worst32_batched_vs_loop64": float(np.max(np.abs(fast[worst] / loop64 - 1))),
    }


def bench_effort(ds, args, codes_path: str, out: Path, sample: bool) -> dict:
    """``sample``: the side-by-side comparison on ``--sample`` users; else all users."""
    from llm_bridge.config import EffortConfig
    from llm_bridge.tiger.effort import run as main
    from llm_bridge.tiger.finetune import load_codes

    codes, sizes = load_codes(codes_path, ds)
    if sample:
        return {
            "load_before": load(),
            **bench_effort_sample(ds, codes, sizes, args.sample, args.effort_batch),
            "load_after": load(),
        }
    cfg = EffortConfig(
        data=args.data,
        backend="tiger",
        semantic_ids=codes_path,
        out=str(out / "effort_tiger.npy"),
        batch_size=args.effort_batch,
        shard_size=4096,
        seed=0,
        resume=True,
    )
    before = load()
    _, wall, cpu = timed(main, cfg)
    return {
        "n_users": ds.n_users,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_before": before,
        "load_after": load(),
        "note": "resumable: wall/CPU of this call only",
    }


# ----------------------------------------------------------------------------- finetune, evaluate
def bench_finetune(ds, args, codes_path: str, out: Path, batch_size: int) -> dict:
    from jaxrec.data import save_scores
    from llm_bridge.config import FinetuneConfig
    from llm_bridge.tiger.finetune import run as main

    sel = np.sort(np.random.default_rng(0).choice(ds.n_users, args.shots, replace=False))
    save_scores(out / "selected.npy", sel, kind="selection", dataset=ds.fingerprint())
    folder = out / f"tiger_bs{batch_size}"
    cfg = FinetuneConfig(
        data=args.data,
        backend="tiger",
        semantic_ids=codes_path,
        selection=str(out / "selected.npy"),
        out=str(folder),
        epochs=args.max_epochs,
        patience=5,
        lr=1e-3,
        weight_decay=0.01,
        schedule="cosine",
        batch_size=batch_size,
        grad_accum=1,
        init_seed=0,
        seed=0,
        resume=False,
    )
    before = load()
    _, wall, cpu = timed(main, cfg)
    rec = json.loads((folder / "train_record.json").read_text())
    return {
        "batch_size": batch_size,
        "shots": args.shots,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_before": before,
        "load_after": load(),
        "epochs": len(rec["epochs"]),
        "best_epoch": rec["best_epoch"],
        "best_valid_loss": rec["best_valid_loss"],
        "seconds_per_epoch": rec["seconds_per_epoch"],
        "n_valid_samples": rec["n_valid_samples"],
        "model": str(folder),
    }


def bench_chunks(ds, codes_path: str, shots: int) -> dict:
    """One epoch's forward/backward passes (batches of 256, train mode) over ``shots`` users:
    length-sorted chunks of ``MICRO_TOKENS`` vs one padded ``[256, longest]`` batch."""
    import torch

    from llm_bridge.tiger.finetune import (
        MICRO_TOKENS,
        _tensors,
        length_chunks,
        load_codes,
    )
    from llm_bridge.tiger.model import build_model, item_tokens, user_samples

    torch.set_num_threads(1)
    codes, sizes = load_codes(codes_path, ds)
    sel = np.random.default_rng(0).choice(ds.n_users, shots, replace=False)
    inputs, targets, _ = user_samples(ds, sel, item_tokens(codes, sizes), 20)
    model = build_model(sizes, 0).train()

    def epoch(max_tokens):
        for start in range(0, len(inputs), 256):
            batch = np.arange(start, min(start + 256, len(inputs)))
            for rows in length_chunks(batch, inputs, max_tokens):
                ids, mask, tgt = _tensors(inputs, targets, rows, "cpu")
                model(input_ids=ids, attention_mask=mask, labels=tgt).loss.backward()

    res = {}
    for name, budget in (("chunked", MICRO_TOKENS), ("padded", 10**9)):
        _, wall, cpu = timed(epoch, budget)
        res[name] = {"wall_s": wall, "cpu_s": cpu}
    res["speedup_cpu"] = round(res["padded"]["cpu_s"] / res["chunked"]["cpu_s"], 2)
    return {"shots": shots, "micro_tokens": MICRO_TOKENS, **res}


def bench_beam_cache(ds, codes, sizes, model_dir: str, n: int) -> dict:
    import torch

    from jaxrec.data import history
    from llm_bridge.evaluate import eval_users
    from llm_bridge.tiger.generate import build_trie, generate
    from llm_bridge.tiger.model import history_input, item_tokens, load_model

    torch.set_num_threads(1)
    rows = eval_users(ds, "test", n, 0)
    tokens, hist = item_tokens(codes, sizes), history(ds, "test")
    inputs = [history_input(hist[r], tokens, 20) for r in rows]
    model, trie = load_model(model_dir), build_trie(codes, sizes)
    res = {}
    for cache in (True, False):
        (items, _), wall, cpu = timed(
            generate, model, inputs, trie, beams=20, batch_size=16, cache=cache, desc=None
        )
        res[f"cache_{cache}"] = {"wall_s": wall, "cpu_s": cpu}
        res.setdefault("items", items)
    same = bool((res.pop("items") == items).all())
    return {"n_users": n, **res, "same_result": same}


def bench_evaluate(ds, args, codes_path: str, out: Path, model_dir: str) -> dict:
    from llm_bridge.config import EvaluateConfig
    from llm_bridge.tiger.evaluate import run as main
    from llm_bridge.tiger.finetune import load_codes

    codes, sizes = load_codes(codes_path, ds)
    result = {
        "load_before": load(),
        "cache_vs_recompute": bench_beam_cache(ds, codes, sizes, model_dir, args.beam_sample),
    }
    cfg = EvaluateConfig(
        data=args.data,
        backend="tiger",
        semantic_ids=codes_path,
        adapter=model_dir,
        out=str(out / "metrics_tiger.json"),
        beams=20,
        batch_size=args.eval_batch,
        split="test",
    )
    _, wall, cpu = timed(main, cfg)
    metrics = json.loads((out / "metrics_tiger.json").read_text())
    result["all_test_users"] = {
        "n_users": metrics["n_users"],
        "wall_s": wall,
        "cpu_s": cpu,
        **{k: metrics[k] for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")},
    }
    result["load_after"] = load()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "games"))
    ap.add_argument("--semantic-ids", default="")
    ap.add_argument("--parts", default="effort-sample,finetune-chunks,finetune,evaluate,effort")
    ap.add_argument("--sample", type=int, default=2048, help="effort side-by-side users")
    ap.add_argument("--beam-sample", type=int, default=256, help="beam cache vs recompute users")
    ap.add_argument("--effort-batch", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--batch-sizes", default="256")
    ap.add_argument("--shots", type=int, default=1024)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--model", default="", help="evaluate this model folder (skips finetune)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_tiger"))
    args = ap.parse_args()

    from jaxrec.data import load_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.data)
    codes_path = args.semantic_ids or str(random_codes_file(ds, out / "random_codes.npy"))
    parts = [p for p in args.parts.split(",") if p]
    path = out / "bench_tiger.json"
    report = json.loads(path.read_text()) if path.is_file() else {}  # parts add up
    report.setdefault("runs", []).append(
        {
            "command": "nice -n 10 python bench/tiger.py " + " ".join(os.sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "semantic_ids": codes_path,
            "parts": parts,
        }
    )
    model_dir = args.model
    for part in parts:
        if part in ("effort-sample", "effort"):
            report[part] = bench_effort(ds, args, codes_path, out, part == "effort-sample")
        elif part == "finetune-chunks":
            report[part] = bench_chunks(ds, codes_path, args.shots)
        elif part == "finetune":
            report["finetune"] = [
                bench_finetune(ds, args, codes_path, out, int(b))
                for b in args.batch_sizes.split(",")
            ]
            model_dir = model_dir or report["finetune"][0]["model"]
        elif part == "evaluate" and model_dir:
            report["evaluate"] = bench_evaluate(ds, args, codes_path, out, model_dir)
        path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
