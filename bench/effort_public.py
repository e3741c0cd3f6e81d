"""The public ``per_sample_grad_norms`` on ONE batch, as a new user calls it, vs a batch-1 loop.

Issue 11: one batch of 16 Games samples of 120-260 tokens, left-padded, float32, SmolLM2 + a
fresh seeded LoRA (random ``lora_B`` so every LoRA tensor has a gradient), eval mode. Paths,
run in alternation for ``--rounds`` rounds so that load from other processes hits all alike:

* ``loop``: one sample at a time, ``model(input_ids, labels).loss``, ``torch.autograd.grad``
  w.r.t. the LoRA parameters, L2 norm (float32);
* ``public``: ``per_sample_grad_norms(model, ids, mask, labels)`` on the whole padded batch
  (defaults: it splits the batch by its token budget itself);
* ``public_bf16``: the same with ``autocast="bf16"``;
* ``one_pass``: ``max_tokens=0`` (the whole batch in one pass: the old behaviour).

    python bench/effort_public.py --rounds 2 --out runs/bench_effort_public.json
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy import stats

from jaxrec.config import GAMES
from jaxrec.data import load_dataset, write_json
from llm_bridge.effort import per_sample_grad_norms
from llm_bridge.prompts import collate, encode_users


def loop_norms(model, samples, params) -> np.ndarray:
    """The reference: one sample at a time, HF loss, autograd.grad, L2 norm (float32)."""
    out = np.zeros(len(samples), dtype=np.float32)
    for i, s in enumerate(samples):
        loss = model(
            input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])
        ).loss
        grads = torch.autograd.grad(loss, params)
        out[i] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return out


def pick_samples(tok, ds, n: int, lo: int, hi: int, seed: int) -> list[dict]:
    """``n`` seeded-random users whose encoded sample has ``lo..hi`` tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for row in rng.permutation(ds.n_users):
        s = encode_users(tok, ds, [int(row)], cutoff_len=512, train_on_inputs=False)[0]
        if lo <= len(s["input_ids"]) <= hi:
            out.append(s)
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} samples of {lo}-{hi} tokens")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=GAMES)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-one-pass", action="store_true")
    ap.add_argument("--out", default="runs/bench_effort_public.json")
    args = ap.parse_args()
    from llm_bridge.model import add_lora, load_tokenizer_and_model

    tok, model, info = load_tokenizer_and_model("", device="cpu", dtype="float32")
    torch.manual_seed(0)
    model = add_lora(model)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    samples = pick_samples(tok, load_dataset(args.data), args.n, 120, 260, 0)
    batch = collate(samples, tok.pad_token_id, "left")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    paths = {
        "loop": lambda: loop_norms(model, samples, params),
        "public": lambda: per_sample_grad_norms(model, ids, mask, labels).numpy(),
        "public_bf16": lambda: per_sample_grad_norms(
            model, ids, mask, labels, autocast="bf16"
        ).numpy(),
    }
    if not args.skip_one_pass:
        paths["one_pass"] = lambda: per_sample_grad_norms(
            model, ids, mask, labels, max_tokens=0
        ).numpy()
    seconds = {k: [] for k in paths}
    values = {}
    for r in range(args.rounds):
        for name, fn in paths.items():
            t = time.perf_counter()
            values[name] = np.asarray(fn(), np.float64)
            seconds[name].append(time.perf_counter() - t)
            print(f"round {r + 1} {name}: {seconds[name][-1]:.2f} s", flush=True)
    ref = values["loop"]
    result = {
        "model": info,
        "n": args.n,
        "tokens": [len(s["input_ids"]) for s in samples],
        "padded_shape": list(ids.shape),
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "seconds": seconds,
        "paths": {},
    }
    for name in paths:
        rel = np.abs(values[name] - ref) / np.abs(ref)
        result["paths"][name] = {
            "best_s": min(seconds[name]),
            "speedup_per_round": [lp / x for lp, x in zip(seconds["loop"], seconds[name])],
            "max_rel_diff": float(rel.max()),
            "median_rel_diff": float(np.median(rel)),
            "spearman": float(stats.spearmanr(values[name], ref)[0]),
        }
    print(result["paths"])
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
