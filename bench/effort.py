"""Effort scores (paper Eq. 12): batched per-sample norms vs a batch-1 float32 autograd loop.

Three paths: the loop, the batched exact float32 path and the batched path under bfloat16
autocast.

Both paths score the same seeded sample of Games users with the real SmolLM2 (fresh seeded LoRA
on q_proj/v_proj, all LoRA parameters, eval mode), side by side in one run, in alternation
(loop, batched, batched bf16, loop, ...) so that load from other processes hits both alike.
The loop is
what one would write by hand: ``model(input_ids, labels).loss`` of one sample, then
``torch.autograd.grad`` w.r.t. the LoRA parameters and the L2 norm. Since a fresh LoRA has
``lora_B = 0``, the norms are checked with a random ``lora_B`` too (``--random-b``).

    python bench/effort.py --n 64 --batch-size 16 --max-tokens 1024 --out runs/bench_effort.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from jaxrec.config import GAMES
from jaxrec.data import load_dataset, write_json
from llm_bridge.effort import score_samples
from llm_bridge.loss import labels_every_token
from llm_bridge.prompts import encode_users
from llm_bridge.config import EffortConfig


def loop_norms(model, samples, params) -> np.ndarray:
    """The reference: one sample at a time, HF loss, autograd.grad, L2 norm (float32)."""
    out = np.zeros(len(samples), dtype=np.float32)
    device = next(model.parameters()).device
    for i, s in enumerate(samples):
        ids = torch.tensor([s["input_ids"]], device=device)
        labels = torch.tensor([s["labels"]], device=device)
        loss = model(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss, params)
        out[i] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=GAMES)
    ap.add_argument("--model", default="")
    ap.add_argument("--n", type=int, default=64, help="users (seeded sample)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=1024, help="padded tokens per batch")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both paths")
    ap.add_argument("--random-b", action="store_true", help="random lora_B (nonzero lora_A grads)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_effort.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llm_bridge.model import add_lora, load_tokenizer_and_model

    ds = load_dataset(args.data)
    rows = np.sort(np.random.default_rng(args.seed).choice(ds.n_users, size=args.n, replace=False))
    torch.manual_seed(args.seed)
    tok, model, info = load_tokenizer_and_model(args.model, device="cpu", dtype="float32")
    model = add_lora(model)
    model.eval()
    if args.random_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = EffortConfig(data=args.data)
    samples = encode_users(
        tok, ds, rows, cutoff_len=cfg.cutoff_len, train_on_inputs=labels_every_token(cfg.loss)
    )
    lengths = [len(s["input_ids"]) for s in samples]
    print(
        f"{args.n} samples, tokens mean {np.mean(lengths):.0f} max {max(lengths)}; "
        f"{len(params)} LoRA tensors, {sum(p.numel() for p in params):,} values; "
        f"{torch.get_num_threads()} threads"
    )

    # warm-up (first-call overheads) on two samples each
    loop_norms(model, samples[:2], params)
    score_samples(model, samples[:2], pad_id=tok.pad_token_id, batch_size=2)
    score_samples(model, samples[:2], pad_id=tok.pad_token_id, batch_size=2, autocast="bf16")

    paths = {
        "loop_fp32": lambda: loop_norms(model, samples, params),
        "batched_fp32": lambda: score_samples(
            model,
            samples,
            pad_id=tok.pad_token_id,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
        ),
        "batched_bf16_autocast": lambda: score_samples(
            model,
            samples,
            pad_id=tok.pad_token_id,
            batch_size=args.batch_size,
            autocast="bf16",
            max_tokens=args.max_tokens,
        ),
    }
    seconds = {k: [] for k in paths}
    norms = {}
    for r in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            norms[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k} {args.n / v[-1]:.2f} samples/s" for k, v in seconds.items())
        )
    ref = norms["loop_fp32"]

    def ranks(x):
        return np.argsort(np.argsort(x))

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "model": info["model"],
        "n": args.n,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "random_lora_b": args.random_b,
        "mean_tokens": float(np.mean(lengths)),
        "longest_sample_tokens": int(max(lengths)),
        "seconds": seconds,
        "mean_norm": float(np.mean(ref)),
        "samples_per_s": {k: args.n / min(v) for k, v in seconds.items()},
        "speedup_vs_loop": {k: min(seconds["loop_fp32"]) / min(v) for k, v in seconds.items()},
        "speedup_per_round": {
            k: [a / b for a, b in zip(seconds["loop_fp32"], v)] for k, v in seconds.items()
        },
        "max_rel_diff": {k: float(np.max(np.abs(v - ref) / np.abs(ref))) for k, v in norms.items()},
        "median_rel_diff": {
            k: float(np.median(np.abs(v - ref) / np.abs(ref))) for k, v in norms.items()
        },
        "spearman": {k: float(np.corrcoef(ranks(v), ranks(ref))[0, 1]) for k, v in norms.items()},
    }
    write_json(Path(args.out), result)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "samples_per_s",
                    "speedup_vs_loop",
                    "speedup_per_round",
                    "max_rel_diff",
                    "median_rel_diff",
                    "spearman",
                )
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
