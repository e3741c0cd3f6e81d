"""``dealrec evaluate``: BIGRec generation, grounding to items, Recall@K and NDCG@K.

For every user with items in the split (history = train titles for ``valid``, train + valid
titles for ``test``), the fine-tuned model writes a title with beam search (4 beams, greedy
otherwise); the text is *grounded* to real items as in BIGRec: the base model (adapter off)
embeds the generated text and every item title as its last-layer hidden state at the last
token, and all items are ranked by L2 distance to the generated text's embedding (no masking of
items the user already had).

Items that share a title (366 titles on Games) keep their own ids. Identical text gives an
identical embedding (each distinct title is embedded once and shared), so such items are at the
same distance and sit next to each other in the ranking, ordered by item id; each occupies its
own rank. Ties of any kind are broken by item id, so the ranking is deterministic.

Metrics (the ground truth is the set of all the user's items in the split):
``Recall@K = hits@K / |truth|``, ``NDCG@K = DCG@K / IDCG@K`` with the ideal DCG over
``min(|truth|, K)`` positions (the same definitions as :mod:`jaxrec.metrics`).
"""

from __future__ import annotations

from typing import Any

import contextlib
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from jaxrec.data import history, load_dataset, write_json
from jaxrec.data.scorefiles import atomic_write_bytes
from jaxrec.errors import UserError
from llm_bridge.backend import get_backend
from llm_bridge.config import EvaluateConfig
from llm_bridge.effort import per_sample_losses
from llm_bridge.metrics import KS, eval_users, rank_metrics
from llm_bridge.model import (
    add_lora,
    check_adapter_folder,
    default_model_path,
    load_tokenizer_and_model,
    position_ids,
    unwrap,
)
from llm_bridge.prompts import IGNORE, collate, encode_sample
from llm_bridge.runtime import eval_mode, jsonable


def rank_items(query: np.ndarray, item_emb: np.ndarray, k: int) -> np.ndarray:
    """BIGRec grounding: the ``k`` items nearest (L2) to each query, ``[n_queries, k]`` 1-based
    item ids; ``item_emb[j]`` is item ``j + 1``. Ties go to the smaller item id, exactly (tied
    items at the K boundary are never dropped in favour of a larger id)."""
    query = np.asarray(query, dtype=np.float64)
    items = np.asarray(item_emb, dtype=np.float64)
    k = min(k, len(items))
    sq = (items**2).sum(1)
    out = np.empty((len(query), k), dtype=np.int64)
    for u, q in enumerate(query):
        dist = np.sqrt(np.maximum(sq - 2.0 * items @ q + q @ q, 0.0))
        kth = np.partition(dist, k - 1)[k - 1]
        cand = np.flatnonzero(dist <= kth)  # all items tied at the boundary
        cand = cand[np.lexsort((cand, dist[cand]))][:k]  # distance, then item id
        out[u] = cand + 1
    return out


# ----------------------------------------------------------------------------- embeddings
def _left_padded(ids: list[list[int]], pad: int) -> dict:
    """``input_ids`` and ``attention_mask`` of token lists, left-padded (for generation and
    last-token embeddings)."""
    return collate([{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids], pad, "left")


def _base(model):
    """The underlying ``LlamaForCausalLM`` and a context that switches the adapter off."""
    no_adapter = (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )
    return unwrap(model), no_adapter


@torch.no_grad()
def embed_texts(
    model: Any, tokenizer: Any, texts: list[str], *, batch_size: int = 32, desc: str | None = None
) -> np.ndarray:
    """BIGRec's text embedding: the base model's last-layer hidden state (after the final norm)
    at the last token of each text, ``[len(texts), hidden]`` float32.

    Each distinct text is embedded once, so equal texts get bitwise-equal embeddings; batches
    are left-padded with position ids from the attention mask, so a text's embedding does not
    depend on its batch.
    """
    base, no_adapter = _base(model)
    device = next(base.parameters()).device
    unique = sorted(set(texts), key=lambda t: (len(t), t))
    index = {t: i for i, t in enumerate(unique)}
    hidden = base.config.hidden_size
    emb = np.zeros((len(unique), hidden), dtype=np.float32)
    with eval_mode(model), no_adapter:
        for start in tqdm(
            range(0, len(unique), batch_size),
            desc=desc,
            unit="batch",
            disable=desc is None,
            leave=False,
        ):
            chunk = unique[start : start + batch_size]
            ids = [tokenizer(t)["input_ids"] or [tokenizer.eos_token_id] for t in chunk]
            batch = _left_padded(ids, tokenizer.pad_token_id)
            mask = batch["attention_mask"]
            out = base.model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids(mask).to(device),
            )
            emb[start : start + len(chunk)] = out.last_hidden_state[:, -1].float().cpu().numpy()
    return emb[[index[t] for t in texts]]


def _path_digest(path: Path) -> str:
    """Identity of a model file or folder: names, sizes, and sha256 of each file's first and
    last MiB (fast even for multi-GB weights)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read())
    return digest.hexdigest()


def title_embeddings(
    model: Any,
    tokenizer: Any,
    titles: list[str],
    *,
    model_path: str | Path,
    cache_dir: str | Path,
    batch_size: int = 32,
) -> tuple[np.ndarray, dict]:
    """Embeddings ``[n_items, hidden]`` of ``titles[1:]`` by the base model, cached as ``.npy``.

    The cache key is the model file(s) (names, sizes, head/tail sha256), the dtype and the
    sha256 of the titles; the file is read without pickle. Returns ``(emb, info)``.
    """
    base, _ = _base(model)
    dtype = str(next(base.parameters()).dtype)
    key = hashlib.sha256(
        json.dumps(
            {"model": _path_digest(Path(model_path)), "dtype": dtype, "titles": titles[1:]}
        ).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"title-emb-{key}.npy"
    if path.is_file():
        emb = np.load(path, allow_pickle=False)
        if emb.shape[0] == len(titles) - 1:
            return emb, {"cache": str(path), "cached": True, "seconds": 0.0}
    t0 = time.perf_counter()
    emb = embed_texts(
        model, tokenizer, list(titles[1:]), batch_size=batch_size, desc="embed item titles"
    )
    atomic_write_bytes(path, lambda f: np.save(f, emb, allow_pickle=False))
    return emb, {"cache": str(path), "cached": False, "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------- generation
def clean_response(text: str) -> str:
    """The generated title: the first line of the response, without surrounding quotes."""
    text = text.strip().split("\n")[0].strip()
    return text.strip('"').strip()


def prompt_ids(tokenizer: Any, history_titles: list[str], cutoff_len: int = 512) -> list[int]:
    """Token ids of the inference prompt: the training template and truncation rule of
    :func:`llm_bridge.prompts.encode_sample` (oldest titles dropped to fit ``cutoff_len``) with
    an empty response; the ids are the sample's prompt part (its ``-100`` labels)."""
    enc = encode_sample(tokenizer, history_titles, "", cutoff_len=cutoff_len, train_on_inputs=False)
    ids, labels = list(enc["input_ids"]), list(enc["labels"])
    n = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(ids))
    return ids[:n]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    ids: list[list[int]],
    *,
    beams: int = 4,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    desc: str | None = "generate",
) -> list[str]:
    """Beam-search responses to the prompts ``ids`` (batched, left-padded), decoded, cleaned."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    order = np.argsort([len(x) for x in ids], kind="stable")
    out: list[str] = [""] * len(ids)
    model.eval()
    bar = tqdm(total=len(ids), desc=desc, unit="user", disable=desc is None)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = _left_padded([ids[r] for r in rows], pad)
        width = batch["input_ids"].shape[1]
        gen = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            num_beams=beams,
            num_return_sequences=1,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for r, seq in zip(rows, gen[:, width:]):
            out[r] = clean_response(tokenizer.decode(seq, skip_special_tokens=True))
        bar.update(len(rows))
    bar.close()
    return out


@torch.no_grad()
def target_losses(
    model: Any,
    tokenizer: Any,
    histories: list[list[str]],
    targets: list[str],
    *,
    cutoff_len: int = 512,
    batch_size: int = 8,
) -> np.ndarray:
    """``[n]`` the fine-tuned model's Eq. 1 loss of each user's first split item's title given
    the prompt (the per-user difficulty of paper Fig. 6)."""
    samples = [
        encode_sample(tokenizer, h, t, cutoff_len=cutoff_len) for h, t in zip(histories, targets)
    ]
    device = next(model.parameters()).device
    out = np.zeros(len(samples))
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size], tokenizer.pad_token_id, "right")
        batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
        out[start : start + batch_size] = (
            per_sample_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            .float()
            .cpu()
        )
    return out


# ----------------------------------------------------------------------------- main
def main(cfg: EvaluateConfig) -> int:
    """``dealrec evaluate``: the evaluation of ``cfg.backend`` (:mod:`llm_bridge.backend`)."""
    return get_backend(cfg.backend).evaluate(cfg)


def run(cfg: EvaluateConfig) -> int:
    """BIGRec's evaluation: generate for each evaluated user, ground to items by L2 distance of
    base-model embeddings, write Recall/NDCG@{10,20} to ``cfg.out`` and predictions beside it.

    Long because: the stage's steps in order, timed between them (load, generation,
    grounding), and the result record that reports those times."""
    if cfg.adapter:
        check_adapter_folder(cfg.adapter)
    if cfg.beams < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise UserError("beams, max_new_tokens and batch_size must be >= 1")
    ds = load_dataset(cfg.data)
    rows = eval_users(ds, cfg.split, cfg.users, cfg.seed)
    t0 = time.perf_counter()
    tokenizer, model, info = _eval_model(cfg)
    load_seconds = time.perf_counter() - t0
    item_emb, cache_info = title_embeddings(
        model,
        tokenizer,
        ds.titles,
        model_path=cfg.model or default_model_path(),
        cache_dir=cfg.cache_dir,
        batch_size=max(cfg.batch_size, 32),
    )
    hist = history(ds, cfg.split)
    prompts = [prompt_ids(tokenizer, [ds.titles[i] for i in hist[r]], cfg.cutoff_len) for r in rows]
    t1 = time.perf_counter()
    texts = generate(
        model,
        tokenizer,
        prompts,
        beams=cfg.beams,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    t2 = time.perf_counter()
    losses = target_losses(
        model,
        tokenizer,
        [[ds.titles[i] for i in hist[r]] for r in rows],
        [ds.titles[int(ds.split(cfg.split)[r][0])] for r in rows],
        cutoff_len=cfg.cutoff_len,
        batch_size=cfg.batch_size,
    )
    pred_emb = embed_texts(
        model, tokenizer, texts, batch_size=max(cfg.batch_size, 32), desc="embed predictions"
    )
    ranked = rank_items(pred_emb, item_emb, max(KS))
    t3 = time.perf_counter()
    truth = [set(int(i) for i in ds.split(cfg.split)[r]) for r in rows]
    metrics = rank_metrics(ranked, truth, KS)
    n_with_items = sum(1 for t in ds.split(cfg.split) if len(t))
    out = Path(cfg.out)
    result = {
        "split": cfg.split,
        **metrics,
        "n_users": int(len(rows)),
        "n_users_with_items": int(n_with_items),
        "subsample": bool(0 < cfg.users < n_with_items),
        "seed": cfg.seed,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_100_users": round((t3 - t1) / len(rows) * 100, 3),
        "seconds_generation": round(t2 - t1, 3),
        "seconds_grounding": round(t3 - t2, 3),
        "seconds_model_load": round(load_seconds, 3),
        "title_embeddings": cache_info,
        "model": cfg.model or "default (SmolLM2-135M-Instruct GGUF)",
        "adapter": cfg.adapter,
        "model_info": jsonable(info),
        "config": asdict(cfg),
        "predictions": str(out.with_suffix(".predictions.jsonl")),
    }
    _write_predictions(
        out.with_suffix(".predictions.jsonl"), ds, rows, texts, ranked, truth, losses
    )
    write_json(out, result)
    print(
        f"evaluate {cfg.split} ({len(rows)} users): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + f"; {result['seconds_per_100_users']:.1f} s per 100 users"
    )
    return 0


def _eval_model(cfg: EvaluateConfig):
    """``(tokenizer, model, info)``: the base LLM with ``cfg.adapter`` (frozen), eval mode."""
    torch.manual_seed(cfg.seed)
    tokenizer, model, info = load_tokenizer_and_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if cfg.adapter:
        model = add_lora(model, adapter=cfg.adapter, trainable=False)
    model.eval()
    return tokenizer, model, info


def _write_predictions(path: Path, ds, rows, texts, ranked, truth, losses) -> None:
    """One JSON line per evaluated user: its generation, top items, true items and the loss of
    its first true item."""
    lines = [
        json.dumps(
            {
                "row": int(r),
                "user_id": int(ds.user_ids[r]),
                "prediction": t,
                "top": [int(i) for i in ranked[j]],
                "truth": sorted(truth[j]),
                "loss": round(float(losses[j]), 6),
            }
        )
        for j, (r, t) in enumerate(zip(rows, texts))
    ]
    blob = ("\n".join(lines) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(blob))
