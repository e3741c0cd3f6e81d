"""``dealrec finetune``: BIGRec LoRA few-shot fine-tune on the selected users (paper Sec. 3.3).

The selected users' training samples (the LLM loss chosen by ``loss=``, :mod:`llm_bridge.loss`:
``response-mean`` by default, ``response-sum`` = paper Eq. 1, ``sequence-mean`` = the official
code's ``--train_on_inputs``) train the LoRA adapter with AdamW (lr 1e-4), gradient
accumulation and a seeded sample order. After every epoch the same users' *valid-period*
samples are scored (history = all train titles, response = the first valid item's title,
for the selected users that have valid items, or with ``valid_users: fixed`` for one seeded
set of users, :func:`~llm_bridge.training.fixed_valid_users`); training stops when that loss has not
improved for ``patience`` epochs, and the adapter of the best epoch is kept. If no selected
user has a valid item, a fixed ``fallback_epochs`` are trained and the last adapter is kept
(the record says so).

Output folder ``OUT``:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the best adapter (peft format);
* ``train_record.json``: settings, seconds, per-epoch train and valid losses, best epoch;
* ``checkpoint/``: adapter, optimizer and RNG state of the last finished epoch, so that a
  killed run continues where it stopped (``--resume``, the default) with the same result.

A plain PyTorch loop (no HF Trainer): every step is visible and the checkpoint is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from jaxrec.data import Dataset, load_dataset, load_scores, write_json
from jaxrec.data.dataset import sha256_file
from jaxrec.data.scorefiles import atomic_write_bytes, environment
from jaxrec.errors import UserError
from llm_bridge import loss as lm_loss
from llm_bridge.backend import get_backend
from llm_bridge.config import FinetuneConfig
from llm_bridge.model import check_adapter_folder, lora_model
from llm_bridge.prompts import collate, encode_users
from llm_bridge.runtime import RESTART, eval_mode, jsonable, read_json, reading
from llm_bridge.training import (
    added_settings,
    check_selection,
    resume_state,
    save_best,
    valid_rows,
)

# Settings that must match for a checkpoint to be continued (``epochs``/``patience`` may grow).
_RESUME_KEYS = (
    "model",
    "adapter",
    "lr",
    "batch_size",
    "grad_accum",
    "cutoff_len",
    "loss",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "seed",
)


def _batches(samples: list[dict], order, batch_size: int, pad_id: int, device):
    for start in range(0, len(order), batch_size):
        batch = collate([samples[i] for i in order[start : start + batch_size]], pad_id, "right")
        yield {k: torch.as_tensor(v).to(device) for k, v in batch.items()}


def micro_batch_loss(model: Any, batch: dict, loss: str) -> tuple[torch.Tensor, int]:
    """``(value, weight)`` of ``loss`` on one padded batch (:func:`llm_bridge.loss.batch_loss`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return lm_loss.batch_loss(logits, batch["labels"], loss, batch["attention_mask"])


@torch.no_grad()
def dataset_loss(
    model: Any,
    samples: list[dict],
    *,
    pad_id: int,
    batch_size: int = 8,
    desc: str | None = None,
    loss: str = "response-mean",
) -> float:
    """``loss`` over ``samples``: the weighted mean of :func:`llm_bridge.loss.batch_loss`
    (token-weighted for the ``*-mean`` losses, per sample for ``response-sum``; eval mode,
    no dropout)."""
    if not samples:
        return float("nan")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = np.argsort([len(s["input_ids"]) for s in samples], kind="stable")
    n_batches = math.ceil(len(samples) / batch_size)
    with eval_mode(model):
        for batch in tqdm(
            _batches(samples, order, batch_size, pad_id, device),
            total=n_batches,
            desc=desc,
            leave=False,
            disable=desc is None,
        ):
            value, n = micro_batch_loss(model, batch, loss)
            if n:
                total += float(value) * n
                count += n
    return total / max(count, 1)


# ----------------------------------------------------------------------------- checkpoints
def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _save_checkpoint(ckpt: Path, epoch: int, model, optimizer, state: dict) -> None:
    """Epoch-numbered adapter + optimizer files, then ``state.json`` (the commit point)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    blob = st_save(_adapter_state(model))
    atomic_write_bytes(ckpt / f"adapter-{epoch}.safetensors", lambda f: f.write(blob))
    extra = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    atomic_write_bytes(ckpt / f"optimizer-{epoch}.pt", lambda f: torch.save(extra, f))
    write_json(ckpt / "state.json", {**state, "epoch": epoch})
    for f in ckpt.iterdir():  # older epochs are no longer needed
        if f.name.startswith(("adapter-", "optimizer-")) and f.stem.split("-")[-1] != str(epoch):
            f.unlink(missing_ok=True)


def _load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    state = read_json(ckpt / "state.json", RESTART)
    epoch = state["epoch"]
    device = next(model.parameters()).device
    with reading(ckpt / f"adapter-{epoch}.safetensors", RESTART):
        set_peft_model_state_dict(
            model, load_file(str(ckpt / f"adapter-{epoch}.safetensors"), device=str(device))
        )
    with reading(ckpt / f"optimizer-{epoch}.pt", RESTART):
        extra = torch.load(ckpt / f"optimizer-{epoch}.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["torch_rng"].cpu())
    return state


# ----------------------------------------------------------------------------- main
def main(cfg: FinetuneConfig) -> int:
    """``dealrec finetune``: the fine-tune of ``cfg.backend`` (:mod:`llm_bridge.backend`)."""
    return get_backend(cfg.backend).finetune(cfg)


def run(cfg: FinetuneConfig) -> int:
    """BIGRec's fine-tune: LoRA on the selection's samples (paper Eq. 1), early-stopped on the
    same users' valid-period loss; write the best adapter and ``train_record.json`` to OUT."""
    ds, selection, out = _check_inputs(cfg)
    ckpt = out / "checkpoint"
    settings = {
        "dataset": ds.fingerprint(),
        "selection_sha256": sha256_file(Path(cfg.selection)),
        **{k: getattr(cfg, k) for k in _RESUME_KEYS},
        **added_settings(cfg),
    }
    resuming = resume_state(cfg.resume, ckpt, settings) is not None
    tokenizer, model, info = lora_model(
        cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        seed=cfg.seed,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        adapter=cfg.adapter,
    )
    enc: dict[str, Any] = dict(
        cutoff_len=cfg.cutoff_len, train_on_inputs=lm_loss.labels_every_token(cfg.loss)
    )
    train = encode_users(tokenizer, ds, selection, split="train", **enc)
    valid = encode_users(tokenizer, ds, valid_rows(ds, selection, cfg), split="valid", **enc)
    early_stopping = len(valid) > 0
    max_epochs = cfg.epochs if early_stopping else min(cfg.epochs, cfg.fallback_epochs)
    if not early_stopping:
        print(
            f"finetune: none of the {len(selection)} selected users has a valid item; "
            f"no early stopping, training a fixed {max_epochs} epochs"
        )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    out.mkdir(parents=True, exist_ok=True)
    record = _new_record(cfg, settings, info, (len(train), len(valid)), max_epochs)
    start_epoch, bad_epochs = 1, 0
    if resuming:
        state = _load_checkpoint(ckpt, model, optimizer)
        record.update(
            {k: state["record"][k] for k in ("epochs", "best_epoch", "best_valid_loss", "seconds")}
        )
        start_epoch, bad_epochs = state["epoch"] + 1, state["bad_epochs"]
        print(f"finetune: resuming after epoch {state['epoch']} from {ckpt}")
    _fit(
        cfg,
        model,
        optimizer,
        (train, valid),
        record,
        out,
        settings,
        (start_epoch, bad_epochs),
        tokenizer.pad_token_id,
    )
    _finish_record(record, len(train), out)
    return 0


def _new_record(
    cfg: FinetuneConfig, settings: dict, info: dict, sizes: tuple[int, int], max_epochs: int
) -> dict:
    """The empty ``train_record.json`` of a run on ``sizes = (train, valid)`` samples."""
    return {
        "settings": settings,
        "config": asdict(cfg),
        "model_info": jsonable(info),
        "n_train_samples": sizes[0],
        "n_valid_samples": sizes[1],
        "early_stopping": sizes[1] > 0,
        "max_epochs": max_epochs,
        "epochs": [],
        "best_epoch": None,
        "best_valid_loss": None,
        "seconds": 0.0,
        "finished": False,
    }


def _fit(
    cfg: FinetuneConfig,
    model: Any,
    optimizer: Any,
    data: tuple[list[dict], list[dict]],
    record: dict,
    out: Path,
    settings: dict,
    start: tuple[int, int],
    pad_id: int,
) -> None:
    """The epoch loop from ``start = (epoch, bad epochs)``: early stopping on the valid loss,
    the best adapter saved (:func:`llm_bridge.training.save_best`), a checkpoint per epoch;
    ``record`` is updated in place."""
    (train, valid), (start_epoch, bad_epochs) = data, start
    ckpt, early_stopping, max_epochs = (
        out / "checkpoint",
        record["early_stopping"],
        record["max_epochs"],
    )
    t_run, seconds_before = time.perf_counter(), record["seconds"]
    model.train()
    for epoch in range(start_epoch, max_epochs + 1):
        if early_stopping and bad_epochs >= cfg.patience:
            break
        entry = _run_epoch(cfg, model, optimizer, train, valid, epoch, max_epochs, pad_id)
        record["epochs"].append(entry)
        valid_loss = entry["valid_loss"]
        improved = (
            (not early_stopping)
            or record["best_valid_loss"] is None
            or valid_loss < record["best_valid_loss"]
        )
        if improved:
            record["best_epoch"], record["best_valid_loss"] = epoch, valid_loss
            bad_epochs = 0
            save_best(model, out)
        else:
            bad_epochs += 1
        record["seconds"] = round(seconds_before + time.perf_counter() - t_run, 3)
        print(
            f"epoch {epoch}: train loss {entry['train_loss']:.4f}"
            + (f", valid loss {valid_loss:.4f}" if early_stopping else "")
            + (" (best)" if improved and early_stopping else "")
        )
        _save_checkpoint(
            ckpt,
            epoch,
            model,
            optimizer,
            {"settings": settings, "bad_epochs": bad_epochs, "record": record},
        )
        # no train_record.json yet: its presence means "finished" to `dealrec run` (the
        # per-epoch record lives in the checkpoint's state.json until then)
    record["seconds"] = round(seconds_before + time.perf_counter() - t_run, 3)


def _check_inputs(cfg: FinetuneConfig):
    """``(dataset, selected rows, output folder)``, every check done before any work."""
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.epochs < 1 or cfg.patience < 1:
        raise UserError("batch_size, grad_accum, epochs and patience must be >= 1")
    if cfg.train_samples != "last":
        raise UserError(f"--train-samples {cfg.train_samples}: tiger only (bigrec: last)")
    if cfg.adapter:
        check_adapter_folder(cfg.adapter)
    ds = load_dataset(cfg.data)
    selection, _ = load_scores(cfg.selection, kind="selection", dataset=ds.fingerprint())
    selection = check_selection(selection, ds.n_users, cfg.selection)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    return ds, selection, out


def _run_epoch(
    cfg, model, optimizer, train, valid, epoch: int, max_epochs: int, pad_id: int
) -> dict:
    """One epoch of AdamW steps over shuffled micro-batches (gradient accumulation over
    ``cfg.grad_accum``; the last group may be short), then the valid loss when there is a
    valid set. Returns the epoch's record entry."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    n_micro = math.ceil(len(train) / cfg.batch_size)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
    losses, steps = [], 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(
        _batches(train, order, cfg.batch_size, pad_id, device),
        total=n_micro,
        desc=f"epoch {epoch}/{max_epochs}",
        unit="batch",
    )
    for i, batch in enumerate(bar):
        group_start = (i // cfg.grad_accum) * cfg.grad_accum
        in_group = min(cfg.grad_accum, n_micro - group_start)
        loss, _ = micro_batch_loss(model, batch, cfg.loss)
        (loss / in_group).backward()
        losses.append(loss.item())
        if i - group_start + 1 == in_group:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        bar.set_postfix(loss=f"{np.mean(losses[-in_group:]):.4f}")
    train_seconds = time.perf_counter() - t0
    valid_loss = (
        dataset_loss(
            model,
            valid,
            pad_id=pad_id,
            batch_size=cfg.batch_size,
            desc="valid loss",
            loss=cfg.loss,
        )
        if valid
        else None
    )
    return {
        "epoch": epoch,
        "train_loss": float(np.mean(losses)),
        "valid_loss": valid_loss,
        "optimizer_steps": steps,
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def warmup(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    loss: str = "response-mean",
    cutoff_len: int = 512,
    seed: int = 0,
    rows: Sequence[int] | np.ndarray | None = None,
) -> list[float]:
    """A short LoRA warm-up (used by ``dealrec effort --warmup-steps``, so ``lora_B != 0``).

    ``steps`` AdamW steps (``lr``, no schedule) on micro-batches of ``batch_size`` training
    samples (:func:`llm_bridge.prompts.encode_users`) of ``rows`` (default every user), drawn
    with a generator seeded by ``seed`` (without replacement while there are enough rows), in
    train mode; the model's train/eval mode is restored. Not in the paper: the official code
    scores with the alpaca-lora-7B adapter, whose ``lora_B`` is already nonzero.

    Args:
      model: the LoRA model (:func:`llm_bridge.model.lora_model`); its trainable parameters
        are updated in place.
      tokenizer, dataset: the model's tokenizer and the dataset of the samples.
      steps, batch_size, lr: AdamW steps, samples per step, learning rate.
      loss: the LLM loss (:mod:`llm_bridge.loss`); cutoff_len: most tokens of a sample.
      seed: seed of the sample draw; rows: the users drawn from (default every user with a
        training sample).

    Returns:
      the loss of each step.

    Long because of this docstring; the code is about 35.
    """
    lm_loss.check_loss(loss)
    if steps < 1 or batch_size < 1:
        raise UserError("warm-up needs steps >= 1 and batch_size >= 1")
    rows = np.flatnonzero(dataset.has_sample) if rows is None else np.asarray(rows)
    n = steps * batch_size
    pick = np.random.default_rng([seed, 7]).choice(rows, size=n, replace=n > len(rows))
    samples = encode_users(
        tokenizer,
        dataset,
        pick,
        cutoff_len=cutoff_len,
        train_on_inputs=lm_loss.labels_every_token(loss),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("warm-up: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=lr)
    device = next(model.parameters()).device
    losses = []
    was_training = model.training
    model.train()
    try:
        order = np.arange(n)
        for batch in tqdm(
            _batches(samples, order, batch_size, tokenizer.pad_token_id, device),
            total=steps,
            desc="warm-up",
            unit="step",
            leave=False,
        ):
            value, _ = micro_batch_loss(model, batch, loss)
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(value.detach()))
    finally:
        model.train(was_training)
    return losses


def _finish_record(record: dict, n_train: int, out: Path) -> None:
    n_epochs = len(record["epochs"])
    record["stopped_early"] = record["early_stopping"] and n_epochs < record["max_epochs"]
    per_epoch = sum(e["train_seconds"] for e in record["epochs"]) / max(n_epochs, 1)
    record["seconds_per_1024_samples_per_epoch"] = (
        round(per_epoch / max(n_train, 1) * 1024, 3) if n_epochs else None
    )
    record["environment"] = environment()
    record["finished"] = True
    write_json(out / "train_record.json", record)
    print(f"finetune: best epoch {record['best_epoch']} of {n_epochs}; adapter in {out}")
