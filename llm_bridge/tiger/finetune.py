"""``dealrec finetune --backend tiger``: TIGER's T5 fully fine-tuned on the selected users.

Every parameter of the randomly initialised T5 (:mod:`llm_bridge.tiger.model`, seed
``init_seed``) trains on the selected users' training samples (input: the codes of the last
``max_history`` history items then EOS; target: the last train item's codes then EOS; loss:
the mean token cross-entropy of the target tokens, as in TIGER) with AdamW (``lr``,
``weight_decay``; no decay on the layer-norm weights, as the HF Trainer of TIGER's few-shot
code does), a per-step cosine schedule from ``lr`` to 0 over ``epochs`` epochs (or a constant
rate), micro-batches of ``batch_size`` with ``grad_accum`` micro-batches per step, dropout 0.1,
and a seeded sample order (``seed``; also the dropout RNG). With ``train_samples: prefixes``
every prefix of a user's train items is a sample, as in the authors' TIGER code (``--subseq``).
After every epoch the same users' valid samples (history = all train items, target = the first
valid item; ``valid_users: fixed``: one seeded set of users instead) are scored in eval
mode; training stops when that loss has not improved for ``patience`` epochs and the best
epoch's model is kept. When no such user has a valid item, a fixed ``fallback_epochs`` are
trained and the last model is kept.

Two options trade exactness for speed on CPU (both off by default; ``bench/tiger_speed.py``
measures them against the default on the same runs): ``autocast: bf16`` runs the training
forward passes under bfloat16 autocast, ``fast_dropout`` draws the dropout masks from 16 random
bits per value (:class:`llm_bridge.tiger.dropout.FastDropout`). ``chunking: cost`` cuts each
length-sorted batch into forward/backward chunks with less padding (:func:`cost_chunks`): the
same batches and gradients up to float rounding, but other dropout masks (they follow the
chunks' shapes).

Output folder ``OUT``: ``config.json`` + ``model.safetensors`` (the best model,
``save_pretrained``), ``checkpoint/`` (the last finished epoch's model, optimizer, scheduler and
RNG state: a killed run continues where it stopped with the same result), and, written last,
``train_record.json`` (settings, the semantic IDs' digest that evaluation checks, per-epoch
losses, best epoch, seconds).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from jaxrec.data import Dataset, load_dataset, load_scores, write_json
from jaxrec.data.dataset import sha256_file
from jaxrec.data.scorefiles import environment
from jaxrec.errors import UserError
from llm_bridge.config import FinetuneConfig
from llm_bridge.runtime import autocast_context, resolve_device_dtype
from llm_bridge.tiger.semantic_ids import load_semantic_ids, vocab_sizes
from llm_bridge.training import (
    added_settings,
    check_selection,
    resume_state,
    save_best,
    valid_rows,
)
from llm_bridge.tiger.checkpoint import load_checkpoint, save_checkpoint
from llm_bridge.tiger.dropout import use_fast_dropout
from llm_bridge.tiger.model import (
    build_model,
    codes_digest,
    cpu_threads,
    item_tokens,
    pad_inputs,
    prefix_samples,
    user_samples,
)

# Settings that must match for a checkpoint to be continued (``patience`` may change).
_RESUME_KEYS = (
    "lr",
    "weight_decay",
    "schedule",
    "epochs",
    "fallback_epochs",
    "batch_size",
    "grad_accum",
    "max_history",
    "init_seed",
    "seed",
)
MICRO_TOKENS = 2048  # padded input tokens per forward/backward chunk (see length_chunks)
# chunking "cost" (see cost_chunks): a chunk's fixed cost and a row's decoder cost, in padded
# encoder tokens (fitted to one-thread CPU epochs of TIGER's T5 on Games, docs/benchmarks.md)
CHUNK_OVERHEAD, ROW_TOKENS, MAX_CHUNK_TOKENS = 300, 8, 8192


# ----------------------------------------------------------------------------- inputs
def load_codes(path: str, ds: Dataset) -> tuple[np.ndarray, list[int]]:
    """The semantic IDs of ``ds`` from ``path`` (``dealrec semantic-ids``) and their codebook
    sizes; one-line :class:`UserError` when missing or made for another dataset."""
    if not path:
        raise UserError("--backend tiger needs --semantic-ids (the file of `dealrec semantic-ids`)")
    codes, manifest = load_semantic_ids(path, ds)
    return codes, vocab_sizes(manifest)


def train_samples(
    ds: Dataset, selection: np.ndarray, tokens: np.ndarray, cfg: FinetuneConfig
) -> tuple[list[list[int]], np.ndarray]:
    """The selected users' training samples: one per user (``train_samples: last``,
    :func:`~llm_bridge.tiger.model.user_samples`) or every prefix (``prefixes``,
    :func:`~llm_bridge.tiger.model.prefix_samples`).

    Args:
      ds: the dataset; selection: the selected user rows; tokens: the items' tokens
        (:func:`~llm_bridge.tiger.model.item_tokens`); cfg: its ``train_samples`` and
        ``max_history``.
    Returns:
      ``(inputs: encoder token lists, targets [n, L + 1] int64)``.
    """
    if cfg.train_samples not in ("last", "prefixes"):
        raise UserError(f"--train-samples {cfg.train_samples!r}: expected last or prefixes")
    if cfg.train_samples == "prefixes":
        inputs, targets, _ = prefix_samples(ds, selection, tokens, cfg.max_history)
    else:
        inputs, targets, _ = user_samples(ds, selection, tokens, cfg.max_history, "train")
    if not inputs:
        raise UserError("--train-samples prefixes: no selected user has two train items")
    return inputs, targets


def _check(cfg: FinetuneConfig) -> None:
    if min(cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.patience, cfg.fallback_epochs) < 1:
        raise UserError("batch_size, grad_accum, epochs, patience and fallback_epochs must be >= 1")
    if cfg.max_history < 1 or cfg.lr <= 0 or cfg.weight_decay < 0:
        raise UserError("max_history must be >= 1, lr > 0 and weight_decay >= 0")
    if cfg.schedule not in ("constant", "cosine"):
        raise UserError(f"--schedule {cfg.schedule!r}: expected constant or cosine")
    if cfg.chunking not in CHUNKINGS:
        raise UserError(f"--chunking {cfg.chunking!r}: expected {' or '.join(CHUNKINGS)}")


def _tensors(inputs, targets, rows, device):
    ids, mask = pad_inputs([inputs[r] for r in rows], device)
    return ids, mask, torch.as_tensor(targets[rows], device=device)


def length_chunks(
    rows: Sequence[int] | np.ndarray, inputs: list[list[int]], max_tokens: int = MICRO_TOKENS
) -> list[np.ndarray]:
    """``rows`` sorted by input length and cut into chunks of at most ``max_tokens`` padded
    tokens (at least one row each): a batch's gradient is the sum of its chunks' gradients,
    with far less padding than one ``[B, longest]`` batch.

    Args:
      rows: indices into ``inputs``; inputs: encoder token lists; max_tokens: the budget.
    Returns:
      the chunks in increasing length, together a partition of ``rows``.
    """
    rows = np.asarray(rows)[np.argsort([len(inputs[r]) for r in rows], kind="stable")]
    chunks, start = [], 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or len(inputs[rows[end]]) * (end + 1 - start) > max_tokens:
            chunks.append(rows[start:end])
            start = end
    return chunks


def cost_chunks(
    rows: Sequence[int] | np.ndarray,
    inputs: list[list[int]],
    overhead: float = CHUNK_OVERHEAD,
    row_tokens: float = ROW_TOKENS,
    max_tokens: int = MAX_CHUNK_TOKENS,
) -> list[np.ndarray]:
    """``rows`` sorted by input length and cut where the cost of the chunks is least:
    ``sum over chunks of overhead + rows * (longest + row_tokens)`` (padded encoder tokens, a
    fixed cost per forward/backward and the decoder's tokens per row), no chunk over
    ``max_tokens`` padded tokens unless it is one row. Dynamic programming over the cut points
    (O(n^2) for n rows). The batch and its gradient are those of :func:`length_chunks`; only
    the cut differs (less padding than the greedy cut at a fixed token budget).

    Returns:
      the chunks in increasing length, together a partition of ``rows``.
    """
    rows = np.asarray(rows)
    rows = rows[np.argsort([len(inputs[r]) for r in rows], kind="stable")]
    n = len(rows)
    lengths = np.array([len(inputs[r]) for r in rows], dtype=np.float64)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        count = end - np.arange(end)  # rows of the chunk rows[start:end] for every start
        cost = best[:end] + overhead + count * (lengths[end - 1] + row_tokens)
        cost[(count * lengths[end - 1] > max_tokens) & (count > 1)] = np.inf
        cut[end] = int(np.argmin(cost))
        best[end] = cost[cut[end]]
    chunks, end = [], n
    while end > 0:
        chunks.append(rows[cut[end] : end])
        end = int(cut[end])
    return chunks[::-1]


CHUNKINGS: dict[str, Callable[..., list[np.ndarray]]] = {
    "tokens": length_chunks,
    "cost": cost_chunks,
}


@torch.no_grad()
def dataset_loss(
    model: Any, inputs: list[list[int]], targets: np.ndarray, batch_size: int = 256
) -> float:
    """Mean over samples (= over target tokens: all samples have ``L + 1``) of the loss, eval
    mode (the model's train/eval mode is restored).

    Args:
      model: the ``T5ForConditionalGeneration``; inputs, targets: samples as
        :func:`train_samples` returns them; batch_size: the least token budget of a chunk.
    Returns:
      the mean loss; ``nan`` for no samples.
    """
    if not len(inputs):
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for rows in length_chunks(range(len(inputs)), inputs, max(MICRO_TOKENS, batch_size)):
        ids, mask, tgt = _tensors(inputs, targets, rows, device)
        total += float(model(input_ids=ids, attention_mask=mask, labels=tgt).loss) * len(ids)
    model.train(was_training)
    return total / len(inputs)


# ----------------------------------------------------------------------------- optimisation
def make_optimizer(
    model: Any, cfg: FinetuneConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over all parameters (no weight decay on layer norms) and a per-step ``LambdaLR``:
    cosine from ``lr`` to 0 over ``total_steps``, or constant.

    Args:
      model: the ``T5ForConditionalGeneration``; cfg: its ``lr``, ``weight_decay`` and
        ``schedule``; total_steps: optimizer steps of the whole run (the cosine's length).
    Returns:
      ``(optimizer, scheduler)``.
    """
    decay = [p for n, p in model.named_parameters() if "layer_norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "layer_norm" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    if cfg.schedule == "cosine":

        def factor(step):
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    else:

        def factor(step):
            return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_epoch(
    model: Any,
    inputs: list[list[int]],
    targets: np.ndarray,
    order: np.ndarray,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    grad_accum: int,
    autocast: str = "",
    chunking: str = "tokens",
) -> tuple[float, int]:
    """One epoch over ``order`` in batches of ``batch_size`` samples, ``grad_accum`` batches
    per optimizer step (the last step may take fewer). Each batch runs as length-sorted chunks
    (:func:`length_chunks`) whose losses are weighted by their share of the batch, so the
    gradient is that of the batch's mean loss. ``autocast="bf16"`` runs each forward (only:
    autocast caches a bfloat16 copy of every parameter until it exits, stale after a step)
    under bfloat16 autocast; parameters, gradients and AdamW's state stay float32.
    ``chunking`` picks the cut (:data:`CHUNKINGS`: ``tokens`` = :func:`length_chunks`,
    ``cost`` = :func:`cost_chunks`).

    Returns:
      ``(mean batch loss, number of optimizer steps)``.
    """
    model.train()
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    losses, steps = [], 0
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        group_start = (i // grad_accum) * grad_accum
        in_group = min(grad_accum, len(batches) - group_start)
        total = 0.0
        for rows in CHUNKINGS[chunking](batch, inputs):
            ids, mask, tgt = _tensors(inputs, targets, rows, device)
            with autocast_context(device, autocast):
                out = model(input_ids=ids, attention_mask=mask, labels=tgt)
            loss = out.loss.float() * (len(rows) / len(batch))
            (loss / in_group).backward()
            total += loss.item()
        losses.append(total)
        if i - group_start + 1 == in_group:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
    return float(np.mean(losses)), steps


# ----------------------------------------------------------------------------- main
def _fit(
    model: Any,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    cfg: FinetuneConfig,
    train: tuple[list, np.ndarray],
    valid: tuple[list, np.ndarray],
    record: dict,
    out: Path,
    resume: dict | None,
) -> dict:
    """The epoch loop with early stopping, best-model saving and per-epoch checkpoints.

    Long because: one loop whose state (best epoch, bad epochs, seconds) is saved with every
    checkpoint; split, that state would be passed back and forth."""
    ckpt, early = out / "checkpoint", record["early_stopping"]
    max_epochs, n_train = record["max_epochs"], len(train[0])
    start_epoch, bad = 1, 0
    if resume is not None:
        state = load_checkpoint(ckpt, model, opt, sched)
        record.update(
            {k: state["record"][k] for k in ("epochs", "best_epoch", "best_valid_loss", "seconds")}
        )
        start_epoch, bad = state["epoch"] + 1, state["bad_epochs"]
        print(f"finetune: resuming after epoch {state['epoch']} from {ckpt}")
    t_run, seconds_before = time.perf_counter(), record["seconds"]
    bar = tqdm(
        range(start_epoch, max_epochs + 1),
        initial=start_epoch - 1,
        total=max_epochs,
        desc="finetune tiger",
        unit="epoch",
    )
    for epoch in bar:
        if early and bad >= cfg.patience:
            break
        t0, cpu0 = time.perf_counter(), time.process_time()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
        loss, steps = train_epoch(
            model,
            *train,
            order,
            opt,
            sched,
            cfg.batch_size,
            cfg.grad_accum,
            cfg.autocast,
            cfg.chunking,
        )
        train_seconds = time.perf_counter() - t0
        vloss = dataset_loss(model, *valid, batch_size=max(cfg.batch_size, 256)) if early else None
        record["epochs"].append(
            {
                "epoch": epoch,
                "train_loss": loss,
                "valid_loss": vloss,
                "optimizer_steps": steps,
                "lr": sched.get_last_lr()[0],
                "train_seconds": round(train_seconds, 3),
                "seconds": round(time.perf_counter() - t0, 3),
                "cpu_seconds": round(time.process_time() - cpu0, 3),
            }
        )
        improved = (
            not early or record["best_valid_loss"] is None or vloss < record["best_valid_loss"]
        )
        if improved:
            record["best_epoch"], record["best_valid_loss"], bad = epoch, vloss, 0
            save_best(model, out)
        else:
            bad += 1
        record["seconds"] = round(seconds_before + time.perf_counter() - t_run, 3)
        bar.set_postfix(
            loss=f"{loss:.4f}", valid=f"{vloss:.4f}" if early else "-", best=record["best_epoch"]
        )
        save_checkpoint(
            ckpt,
            epoch,
            model,
            opt,
            sched,
            {"settings": record["settings"], "bad_epochs": bad, "record": record},
        )
    bar.close()
    return record


def run(cfg: FinetuneConfig) -> int:
    """TIGER's fine-tune: all T5 parameters on the selection's samples, early-stopped on the
    same users' valid loss; write the best model, then ``train_record.json``, to ``cfg.out``.

    Long because: the checks, the settings a checkpoint must match and the record's fields,
    each once, in the order the files are written."""
    _check(cfg)
    ds = load_dataset(cfg.data)
    codes, sizes = load_codes(cfg.semantic_ids, ds)
    selection, _ = load_scores(cfg.selection, kind="selection", dataset=ds.fingerprint())
    selection = check_selection(selection, ds.n_users, cfg.selection)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    settings = {
        "dataset": ds.fingerprint(),
        "selection_sha256": sha256_file(Path(cfg.selection)),
        "semantic_ids": codes_digest(codes, sizes),
        **{k: getattr(cfg, k) for k in _RESUME_KEYS},
        # options added later (the protocol and speed options) join only when set, so
        # checkpoints made before them still resume
        **added_settings(cfg),
    }
    resume = resume_state(cfg.resume, out / "checkpoint", settings)
    device, _ = resolve_device_dtype(cfg.device, "float32")
    model = build_model(sizes, cfg.init_seed, device)
    if cfg.fast_dropout:
        use_fast_dropout(model)
    autocast_context(device, cfg.autocast)  # a bad value fails before any work
    torch.manual_seed(cfg.seed)  # sample order is numpy; this is dropout
    tokens = item_tokens(codes, sizes)
    train = train_samples(ds, selection, tokens, cfg)
    valid = user_samples(ds, valid_rows(ds, selection, cfg), tokens, cfg.max_history, "valid")[:2]
    early = len(valid[0]) > 0
    max_epochs = cfg.epochs if early else min(cfg.epochs, cfg.fallback_epochs)
    if not early:
        print(
            f"finetune: none of the {len(selection)} selected users has a valid item; "
            f"no early stopping, training a fixed {max_epochs} epochs"
        )
    steps = max_epochs * math.ceil(math.ceil(len(train[0]) / cfg.batch_size) / cfg.grad_accum)
    opt, sched = make_optimizer(model, cfg, steps)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "backend": "tiger",
        "settings": settings,
        "config": asdict(cfg),
        "semantic_ids_path": str(cfg.semantic_ids),
        "device": str(device),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train_samples": len(train[0]),
        "n_valid_samples": len(valid[0]),
        "early_stopping": early,
        "max_epochs": max_epochs,
        "epochs": [],
        "best_epoch": None,
        "best_valid_loss": None,
        "seconds": 0.0,
    }
    with cpu_threads(device):
        record = _fit(model, opt, sched, cfg, train, valid, record, out, resume)
    n_epochs = len(record["epochs"])
    record["stopped_early"] = early and n_epochs < max_epochs
    record["seconds_per_epoch"] = round(record["seconds"] / max(n_epochs, 1), 3)
    record["environment"] = environment()
    record["finished"] = True
    write_json(out / "train_record.json", record)
    print(f"finetune: best epoch {record['best_epoch']} of {n_epochs}; model in {out}")
    return 0
