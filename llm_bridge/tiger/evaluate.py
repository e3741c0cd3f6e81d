"""``dealrec evaluate --backend tiger``: trie-constrained beam search, Recall@K and NDCG@K.

For every user with items in the split (history = train items for ``valid``, train + valid
items for ``test``; the last ``max_history`` of them), the fine-tuned T5 generates the top
``beams`` (>= 20) semantic IDs by beam search constrained to the IDs of all items
(:mod:`llm_bridge.tiger.generate`); they map one-to-one to items, best first (no masking of
items the user already had, as in BIGRec's protocol). Metrics are those of BIGRec's evaluation
(:func:`llm_bridge.metrics.rank_metrics`), the predictions go beside ``cfg.out`` in the same
format (``row``, ``user_id``, ``top``, ``truth``; plus the beam ``scores``).

The model folder's ``train_record.json`` holds the digest of the semantic IDs it was trained on;
evaluating with other IDs (or another dataset) is a one-line error.
"""

from __future__ import annotations

from typing import Any

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from jaxrec.data import Dataset, history, load_dataset, write_json
from jaxrec.data.scorefiles import atomic_write_bytes
from jaxrec.errors import UserError
from llm_bridge.config import EvaluateConfig
from llm_bridge.metrics import KS, eval_users, rank_metrics
from llm_bridge.runtime import autocast_context, read_json, resolve_device_dtype
from llm_bridge.tiger.finetune import load_codes
from llm_bridge.tiger.generate import build_trie, generate
from llm_bridge.tiger.model import (
    Spec,
    codes_digest,
    cpu_threads,
    history_input,
    item_tokens,
    load_model,
    pad_inputs,
    params_of,
    sample_losses,
    target_tokens,
)


def check_model_folder(folder: str, ds: Dataset, codes: np.ndarray, sizes: list[int]) -> dict:
    """The ``train_record.json`` of a finished TIGER fine-tune in ``folder``.

    Raises :class:`UserError` (one line) when the folder is not one, or was trained on another
    dataset or other semantic IDs."""
    if not folder:
        raise UserError(
            "--backend tiger needs --adapter: the model folder of "
            "`dealrec finetune --backend tiger`"
        )
    path = Path(folder)
    rec = path / "train_record.json"
    if not rec.is_file() or not (path / "config.json").is_file():
        raise UserError(
            f"{path}: not a finished TIGER model folder (no train_record.json or config.json)"
        )
    record = read_json(rec, "re-run `dealrec finetune --backend tiger` into this folder")
    settings = record.get("settings", {})
    if record.get("backend") != "tiger":
        raise UserError(
            f"{path}: not a TIGER model folder (train_record.json has no backend tiger)"
        )
    if settings.get("dataset") != ds.fingerprint():
        raise UserError(f"{path}: model trained on another dataset (fingerprint mismatch)")
    if settings.get("semantic_ids") != codes_digest(codes, sizes):
        raise UserError(
            f"{path}: model trained on other semantic IDs "
            f"({record.get('semantic_ids_path', '?')}); pass those with --semantic-ids"
        )
    return record


def _check(cfg: EvaluateConfig) -> None:
    if cfg.beams < 20:
        raise UserError(f"--beams {cfg.beams}: TIGER needs at least 20 beams for Recall@20")
    if cfg.batch_size < 1 or cfg.max_history < 1:
        raise UserError("batch_size and max_history must be >= 1")


@torch.no_grad()
def target_losses(
    model: Any,
    inputs: list[list[int]],
    targets: np.ndarray,
    batch_size: int = 256,
    autocast: str = "",
) -> np.ndarray:
    """``[n]`` each user's loss (mean token cross-entropy, eval mode) of the first item of the
    split given the history: the per-user difficulty of paper Fig. 6 (``autocast="bf16"``:
    the forward under bfloat16 autocast)."""
    p, spec = params_of(model), Spec.of(model.config)
    device = next(model.parameters()).device
    order = np.argsort([len(x) for x in inputs], kind="stable")
    out = np.zeros(len(inputs))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad_inputs([inputs[r] for r in rows], device)
        tgt = torch.as_tensor(targets[rows], device=device)
        with autocast_context(device, autocast):
            out[rows] = sample_losses(p, spec, ids, mask, tgt).float().cpu().numpy()
    return out


def _predictions(ds, rows, items, scores, truth, losses, k: int) -> bytes:
    """One JSON line per user: its top ``k`` items and their beam log-probs, best first."""
    lines = [
        json.dumps(
            {
                "row": int(r),
                "user_id": int(ds.user_ids[r]),
                "loss": round(float(losses[j]), 6),
                "top": [int(i) for i in items[j, :k] if i > 0],
                "scores": [
                    round(float(s), 5) for i, s in zip(items[j, :k], scores[j, :k]) if i > 0
                ],
                "truth": sorted(truth[j]),
            }
        )
        for j, r in enumerate(rows)
    ]
    return ("\n".join(lines) + "\n").encode()


def run(cfg: EvaluateConfig) -> int:
    """TIGER's evaluation: beam-search every evaluated user's top items, write
    Recall/NDCG@{10,20} to ``cfg.out`` and the predictions beside it
    (``NAME.predictions.jsonl``)."""
    _check(cfg)
    autocast_context(torch.device("cpu"), cfg.autocast)  # a bad value fails before any work
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    codes, sizes = load_codes(cfg.semantic_ids, ds)
    record = check_model_folder(cfg.adapter, ds, codes, sizes)
    rows = eval_users(ds, cfg.split, cfg.users, cfg.seed)
    n_with_items = sum(1 for t in ds.split(cfg.split) if len(t))
    device, _ = resolve_device_dtype(cfg.device, "float32")
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.adapter, device)
    tokens = item_tokens(codes, sizes)
    hist = history(ds, cfg.split)
    inputs = [history_input(hist[r], tokens, cfg.max_history) for r in rows]
    trie = build_trie(codes, sizes)
    t1 = time.perf_counter()
    with cpu_threads(device):
        items, scores = generate(
            model, inputs, trie, beams=cfg.beams, batch_size=cfg.batch_size, autocast=cfg.autocast
        )
        first = np.array([target_tokens(ds.split(cfg.split)[r][0], tokens) for r in rows])
        losses = target_losses(model, inputs, first, max(cfg.batch_size, 256), cfg.autocast)
    t2 = time.perf_counter()
    truth = [{int(i) for i in ds.split(cfg.split)[r]} for r in rows]
    metrics = rank_metrics([[i for i in row if i > 0] for row in items], truth, KS)
    out = Path(cfg.out)
    result = {
        "split": cfg.split,
        **metrics,
        "backend": "tiger",
        "n_users": len(rows),
        "n_users_with_items": int(n_with_items),
        "subsample": bool(0 < cfg.users < n_with_items),
        "seed": cfg.seed,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_100_users": round((t2 - t1) / len(rows) * 100, 3),
        "seconds_generation": round(t2 - t1, 3),
        "device": str(device),
        "adapter": cfg.adapter,
        "train_max_history": record["config"].get("max_history"),
        "semantic_ids": cfg.semantic_ids,
        "config": asdict(cfg),
        "predictions": str(out.with_suffix(".predictions.jsonl")),
    }
    blob = _predictions(ds, rows, items, scores, truth, losses, max(KS))
    atomic_write_bytes(out.with_suffix(".predictions.jsonl"), lambda f: f.write(blob))
    write_json(out, result)
    print(
        f"evaluate {cfg.split} ({len(rows)} users, tiger): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + f"; {result['seconds_per_100_users']:.2f} s per 100 users"
    )
    return 0
