"""Bench: LoRA fine-tune seconds per 1,024 samples per epoch, and evaluation seconds per 100 users.

Real SmolLM2-135M-Instruct (the embedded GGUF, or ``--model``) on Games. Fine-tune runs one
epoch on ``--samples`` seeded users through ``dealrec finetune`` itself (training time only,
the valid-loss pass is reported apart) and scales to 1,024 samples. Evaluation runs the steps
of ``dealrec evaluate`` (prompt, 4-beam generation, base-model embedding of the text, L2
ranking of all 17,332 items) on ``--users`` seeded test users with that adapter and reports
seconds per 100 users. The one-off title-embedding pass (cached per model afterwards) is
timed on ``--titles`` titles and extrapolated to all items; the ranking runs against a
full-size item matrix tiled from those rows (same cost; the bench reports time, not
accuracy). Model loading is reported separately.

    python bench/llm_finetune_eval.py --samples 64 --users 10 --out runs/bench_llm

Results (with the exact command, machine and date) go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jaxrec.config import GAMES
from jaxrec.data import history, load_dataset, save_scores, write_json
from llm_bridge import evaluate, finetune
from llm_bridge.config import FinetuneConfig


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=GAMES)
    p.add_argument("--model", default="")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--titles",
        type=int,
        default=256,
        help="titles embedded to time the one-off (cached) title-embedding pass",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="runs/bench_llm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = load_dataset(args.data)
    rows = np.sort(np.random.default_rng(args.seed).choice(ds.n_users, args.samples, replace=False))
    selection = save_scores(
        out / "selected.npy",
        rows,
        kind="selection",
        dataset=ds.fingerprint(),
        options={"method": "random", "bench": True},
    )
    ft = FinetuneConfig(
        data=args.data,
        selection=str(selection),
        out=str(out / "adapter"),
        model=args.model,
        epochs=1,
        batch_size=args.batch_size,
        grad_accum=16,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        resume=False,
    )
    t0 = time.perf_counter()
    finetune.main(ft)
    ft_wall = time.perf_counter() - t0
    record = json.loads((out / "adapter" / "train_record.json").read_text())
    epoch = record["epochs"][0]

    # evaluation: the same steps as ``dealrec evaluate`` on --users seeded test users
    from llm_bridge.model import add_lora, load_tokenizer_and_model

    t0 = time.perf_counter()
    tok, model, _ = load_tokenizer_and_model(args.model, device=args.device, dtype=args.dtype)
    model = add_lora(model, adapter=str(out / "adapter"), trainable=False)
    load_seconds = time.perf_counter() - t0
    users = evaluate.eval_users(ds, "test", args.users, args.seed)
    hist = history(ds, "test")
    t0 = time.perf_counter()
    title_rows = np.arange(1, min(args.titles, ds.n_items) + 1)
    title_emb = evaluate.embed_texts(
        model, tok, [ds.titles[i] for i in title_rows], batch_size=32, desc="embed titles (sample)"
    )
    title_seconds = time.perf_counter() - t0
    # ranking costs the same against any [n_items, hidden] matrix: tile the measured rows
    item_emb = np.resize(title_emb, (ds.n_items, title_emb.shape[1]))
    t0 = time.perf_counter()
    ids = [evaluate.prompt_ids(tok, [ds.titles[i] for i in hist[u]], 512) for u in users]
    texts = evaluate.generate(
        model, tok, ids, beams=4, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    t1 = time.perf_counter()
    ranked = evaluate.rank_items(evaluate.embed_texts(model, tok, texts), item_emb, 20)
    t2 = time.perf_counter()
    assert ranked.shape == (len(users), 20)
    per_100 = (t2 - t0) / len(users) * 100

    result = {
        "command": "python bench/llm_finetune_eval.py " + " ".join(argv),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_info": record.get("model_info"),
        "finetune": {
            "samples": record["n_train_samples"],
            "batch_size": args.batch_size,
            "train_seconds_one_epoch": epoch["train_seconds"],
            "seconds_per_1024_samples_per_epoch": record["seconds_per_1024_samples_per_epoch"],
            "valid_samples": record["n_valid_samples"],
            "valid_loss_seconds": round(epoch["seconds"] - epoch["train_seconds"], 3),
            "wall_seconds_incl_load": round(ft_wall, 3),
        },
        "evaluate": {
            "users": len(users),
            "beams": 4,
            "max_new_tokens": args.max_new_tokens,
            "seconds_generation": round(t1 - t0, 3),
            "seconds_grounding": round(t2 - t1, 3),
            "seconds_per_100_users": round(per_100, 3),
            "predictions": texts[:3],
            "title_embedding_titles_measured": len(title_rows),
            "title_embedding_seconds_measured": round(title_seconds, 3),
            "title_embedding_seconds_all_items_est": round(
                title_seconds / len(title_rows) * ds.n_items, 1
            ),
            "seconds_model_load": round(load_seconds, 3),
        },
    }
    write_json(out / "bench.json", result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
