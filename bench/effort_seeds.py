"""How much the effort ranking (paper Eq. 12) depends on the LoRA seed: fresh LoRA vs warm-up.

For a seeded sample of Games users, effort scores under 3 LoRA seeds, then the Spearman
correlation of every pair of seeds:

* **fresh LoRA** (``lora_B = 0``, the project's default): the forward pass and the gradient
  ``G`` at every LoRA layer's output do not depend on the seed (``B = 0``), and the per-sample
  gradient of ``lora_B`` is ``G^T (X A_s^T)`` with ``X`` the layer's input and ``A_s`` the
  seed's ``lora_A``. So one forward/backward gives the exact all-LoRA effort of every seed
  (checked against ``dealrec effort``'s own :func:`llm_bridge.effort.score_samples` on a real
  seed-s LoRA for the first users), the ``official``-scope effort (last layer's v_proj lora_B)
  of every seed, and the seed-free limit ``||G^T X||_F`` summed over the q/v projections
  (the base weights' gradient norm, which a fresh LoRA's effort estimates by a random
  projection);
* **warm-up**: per seed, ``dealrec effort --warmup-steps K`` (the seeded LoRA trained K AdamW
  steps on seeded random training samples, then scored with all LoRA parameters).

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/effort_seeds.py --n 500 --autocast bf16 \\
        --out /tmp/i10llm/effort_seeds.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from jaxrec.config import GAMES
from jaxrec.data import load_dataset, write_json
from llm_bridge import effort
from llm_bridge.finetune import warmup
from llm_bridge.model import add_lora, load_tokenizer_and_model
from llm_bridge.prompts import collate, encode_users


def lora_model(model_path: str, seed: int):
    tok, lm, _ = load_tokenizer_and_model(model_path, device="cpu", dtype="float32")
    torch.manual_seed(seed)
    lm = add_lora(lm)
    lm.eval()
    return tok, lm


def lora_layers(model):
    """``{name: (lora_A Linear, lora_B Linear)}`` of every peft LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name] = (module.lora_A["default"], module.lora_B["default"])
    return out


def fresh_norms(model, samples, pad_id, a_mats, last_v, batch_size, max_tokens, autocast):
    """Exact fresh-LoRA effort of every seed (all LoRA params and official scope) and the
    seed-free q/v weight-gradient norm, from one forward/backward per batch."""
    layers = lora_layers(model)
    n, seeds = len(samples), len(a_mats)
    sq_all = np.zeros((seeds, n))
    sq_off = np.zeros((seeds, n))
    sq_w = np.zeros(n)
    lengths = [len(s["input_ids"]) for s in samples]
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if autocast
        else torch.autocast("cpu", enabled=False)
    )
    for idx in effort.length_batches(lengths, batch_size, max_tokens):
        b = collate([samples[i] for i in idx], pad_id, "right")
        xs, ys = {}, {}
        hooks = []
        for name, (a, bl) in layers.items():
            hooks.append(
                a.register_forward_pre_hook(lambda m, inp, k=name, d=xs: d.__setitem__(k, inp[0]))
            )
            hooks.append(
                bl.register_forward_hook(lambda m, inp, out, k=name, d=ys: d.__setitem__(k, out))
            )
        try:
            with torch.enable_grad(), ctx:
                for bl in (v[1] for v in layers.values()):
                    bl.weight.requires_grad_(True)
                losses = effort.per_sample_losses(
                    model, b["input_ids"], b["attention_mask"], b["labels"]
                )
                names = list(ys)
                grads = torch.autograd.grad(losses.sum(), [ys[k] for k in names])
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for k, g in zip(names, grads):
                x, g = xs[k].float(), g.float()
                sq_w[idx] += effort._sq_norm_linear([x], [g], True, False).double().numpy()
                for s, a_s in enumerate(a_mats):
                    h = x @ a_s[k].T
                    p = torch.einsum("bto,btr->bor", g, h).pow(2).sum((1, 2)).double().numpy()
                    sq_all[s, idx] += p
                    if k == last_v:
                        sq_off[s, idx] += p
    return np.sqrt(sq_all), np.sqrt(sq_off), np.sqrt(sq_w)


def pairwise(scores) -> list[float]:
    return [
        float(spearmanr(scores[i], scores[j])[0])
        for i, j in itertools.combinations(range(len(scores)), 2)
    ]


def top_overlap(scores, frac=0.1) -> list[float]:
    k = max(1, int(len(scores[0]) * frac))
    tops = [set(np.argsort(-s)[:k].tolist()) for s in scores]
    return [len(tops[i] & tops[j]) / k for i, j in itertools.combinations(range(len(scores)), 2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=GAMES)
    ap.add_argument("--model", default="")
    ap.add_argument("--n", type=int, default=500, help="users (seeded sample)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--autocast", default="bf16", choices=["", "bf16"])
    ap.add_argument("--warmup-steps", type=int, default=16)
    ap.add_argument("--warmup-batch-size", type=int, default=8)
    ap.add_argument("--warmup-lr", type=float, default=1e-3)
    ap.add_argument("--check", type=int, default=6, help="users checked against score_samples")
    ap.add_argument("--skip-warmup", action="store_true")
    ap.add_argument(
        "--fresh-from", default="", help="OUT.fresh.npy of an earlier run (same --n): skip phase 1"
    )
    ap.add_argument("--out", default="/tmp/i10llm/effort_seeds.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    ds = load_dataset(args.data)
    rows = np.sort(np.random.default_rng(0).choice(ds.n_users, args.n, replace=False))
    # one model at a time when phase 1 is skipped (memory: the machine is shared)
    seeds = args.seeds if not args.fresh_from else args.seeds[:1]
    models = {s: lora_model(args.model, s) for s in seeds}
    tok, lm0 = models[args.seeds[0]]
    samples = encode_users(tok, ds, rows, cutoff_len=512, train_on_inputs=False)
    pad = tok.pad_token_id
    n_layers = lm0.get_base_model().config.num_hidden_layers
    last_v = f"base_model.model.model.layers.{n_layers - 1}.self_attn.v_proj"
    a_mats = [
        {k: a.weight.detach().float().clone() for k, (a, _) in lora_layers(m).items()}
        for _, m in (models[s] for s in seeds)
    ]
    result = {
        "command": "python bench/effort_seeds.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "seeds")
        + " --seeds "
        + " ".join(map(str, args.seeds)),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "n_users": args.n,
        "tokens_mean": float(np.mean([len(s["input_ids"]) for s in samples])),
    }
    if args.fresh_from:
        arr, k = np.load(args.fresh_from), len(args.seeds)
        fresh, official, weight = arr[:k], arr[k : 2 * k], arr[2 * k]
        result["fresh_from"] = args.fresh_from
    else:
        fresh, official, weight = phase1(args, result, models, lm0, samples, pad, a_mats, last_v)
    lm0 = None  # noqa: F841 - free it once its seed is done
    # 2. warm-up: per seed, warm the seeded LoRA, then score with all LoRA parameters
    if not args.skip_warmup:
        warm, t0 = [], time.perf_counter()
        for s in args.seeds:
            tk, m = models.pop(s) if s in models else lora_model(args.model, s)
            steps = warmup(
                m,
                tk,
                ds,
                steps=args.warmup_steps,
                batch_size=args.warmup_batch_size,
                lr=args.warmup_lr,
                seed=s,
            )
            m.eval()
            warm.append(
                effort.score_samples(
                    m,
                    samples,
                    pad_id=pad,
                    batch_size=args.batch_size,
                    max_tokens=args.max_tokens,
                    autocast=args.autocast,
                )
            )
            del m
            gc.collect()
            np.save(Path(args.out).with_suffix(".warm.npy"), np.vstack(warm))
            result.setdefault("warmup_losses", []).append([round(x, 4) for x in steps])
            print(
                f"seed {s} warm-up + scoring done at {time.perf_counter() - t0:.0f} s", flush=True
            )
        result["warmup_seconds"] = round(time.perf_counter() - t0, 1)
        result["warmup_spearman"] = pairwise(warm)
        result["warmup_top10_overlap"] = top_overlap(warm)
        result["warmup_vs_weight_grad_spearman"] = [float(spearmanr(w, weight)[0]) for w in warm]
        result["warmup_vs_fresh_same_seed_spearman"] = [
            float(spearmanr(w, f)[0]) for w, f in zip(warm, fresh)
        ]
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


def phase1(args, result, models, lm0, samples, pad, a_mats, last_v):
    """Fresh LoRA: every seed from one pass, checked against score_samples on real seed models;
    the arrays are saved to OUT.fresh.npy."""
    t0 = time.perf_counter()
    fresh, official, weight = fresh_norms(
        lm0, samples, pad, a_mats, last_v, args.batch_size, args.max_tokens, args.autocast
    )
    result["fresh_seconds"] = round(time.perf_counter() - t0, 1)
    check = []
    for j, s in enumerate(args.seeds):
        ref = effort.score_samples(models[s][1], samples[: args.check], pad_id=pad, batch_size=8)
        f32, _, _ = fresh_norms(lm0, samples[: args.check], pad, [a_mats[j]], last_v, 8, 0, "")
        check.append(float(np.max(np.abs(f32[0] - ref) / ref)))
    result["fresh_check_max_rel_diff_vs_score_samples_f32"] = max(check)
    result["fresh_spearman"] = pairwise(fresh)
    result["fresh_top10_overlap"] = top_overlap(fresh)
    result["official_fresh_spearman"] = pairwise(official)
    result["fresh_vs_weight_grad_spearman"] = [float(spearmanr(f, weight)[0]) for f in fresh]
    result["official_vs_weight_grad_spearman"] = [float(spearmanr(f, weight)[0]) for f in official]
    print(json.dumps(result, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.save(Path(args.out).with_suffix(".fresh.npy"), np.vstack([fresh, official, weight[None]]))
    write_json(args.out, result)
    return fresh, official, weight


if __name__ == "__main__":
    raise SystemExit(main())
