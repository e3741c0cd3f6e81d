"""The BIGRec backend (Bao et al., 2023; the paper's LLM): a LLaMA-family causal LM with LoRA on
``q_proj``/``v_proj`` over text prompts of the user's item titles.

Its effort command is here (:func:`effort`: the per-sample norms of :mod:`llm_bridge.effort`
over :mod:`llm_bridge.shards`); fine-tune, evaluation and user representations are
:func:`llm_bridge.finetune.run`, :func:`llm_bridge.evaluate.run` and
:func:`llm_bridge.user_reps.run`. :data:`BIGREC` is the object the registry
(:mod:`llm_bridge.backend`) returns for ``backend: bigrec``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.data import load_dataset, read_manifest
from jaxrec.errors import UserError
from llm_bridge import evaluate as bigrec_evaluate
from llm_bridge import finetune as bigrec_finetune
from llm_bridge import loss as lm_loss
from llm_bridge import user_reps as bigrec_user_reps
from llm_bridge.config import EffortConfig, EvaluateConfig, FinetuneConfig, UserRepsConfig
from llm_bridge.effort import loss_text, score_samples, scope_params, select_params
from llm_bridge.finetune import warmup
from llm_bridge.model import lora_model
from llm_bridge.prompts import encode_users
from llm_bridge.shards import (
    EFFORT_SHARD,
    existing_shards,
    merge_shards,
    parse_users,
    plan,
    processes,
    report_missing,
    score_shards,
    shard_folder,
)


def check_effort_config(cfg: EffortConfig) -> Path:
    """``cfg.out`` as a Path after every check that needs no model (a bad value fails before
    any work); :class:`UserError` otherwise."""
    out = Path(cfg.out)
    if out.suffix != ".npy":
        raise UserError(f"{out}: the effort file name must end in .npy")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.warmup_steps < 0 or cfg.warmup_batch_size < 1:
        raise UserError("warmup_steps must be >= 0 and warmup_batch_size >= 1")
    lm_loss.check_loss(cfg.loss)
    if cfg.scope not in ("lora", "official") or (cfg.params and cfg.scope != "lora"):
        scope_params(None, cfg.scope, cfg.params)  # raises the UserError
    return out


def effort_settings(cfg: EffortConfig, ds: Any, model_info: dict) -> dict:
    """What must match for effort shards to be combined."""
    return {
        "dataset": ds.fingerprint(),
        "model": model_info["model"],
        "adapter": cfg.adapter,
        "params": cfg.params,
        "scope": cfg.scope,
        "loss": cfg.loss,
        "warmup": [cfg.warmup_steps, cfg.warmup_batch_size, cfg.warmup_lr]
        if cfg.warmup_steps
        else None,
        "cutoff_len": cfg.cutoff_len,
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "seed": cfg.seed,
        "dtype": model_info["dtype"],
        "autocast": cfg.autocast,
    }


def effort(cfg: EffortConfig) -> int:
    """BIGRec's ``dealrec effort``: Eq. 12 (:func:`llm_bridge.effort.score_samples`) for every
    user's sample (or rows ``--users A:B``), sharded and resumable (:mod:`llm_bridge.shards`),
    merged into ``cfg.out`` when every row is scored."""
    out = check_effort_config(cfg)
    ds = load_dataset(cfg.data)
    parse_users(cfg.users, ds.n_users)
    folder = shard_folder(out)
    existing_shards(folder, ds, shard_kind=EFFORT_SHARD)  # another dataset's: fail before work
    procs = processes()
    device = str(procs.device) if cfg.device == "auto" and procs.device is not None else cfg.device
    tokenizer, model, info = scoring_model(cfg, device, ds)
    regex = scope_params(model, cfg.scope, cfg.params)
    chosen = select_params(model, regex or None)
    n_values = int(sum(p.numel() for p in chosen.values()))
    settings = effort_settings(cfg, ds, info)
    todo = plan(
        cfg.users,
        cfg.shard_size,
        cfg.resume,
        ds,
        folder,
        settings,
        shard_kind=EFFORT_SHARD,
        procs=procs,
    )
    if procs.rank == 0:
        resuming = f"; resuming, {todo.skipped} rows of this process already scored"
        print(
            f"effort: rows {todo.start}..{todo.stop - 1} in {todo.n_shards} shards over "
            f"{procs.world} process(es); {len(chosen)} parameter tensors ({n_values:,} values)"
            + (resuming if todo.skipped else "")
        )
    score = _effort_rows(cfg, ds, tokenizer, model, regex)
    score_shards(
        todo.todo,
        score,
        folder=folder,
        ds=ds,
        shard_kind=EFFORT_SHARD,
        settings=settings,
        desc="effort",
        procs=procs,
        batch_size=cfg.batch_size,
        device=info["device"],
    )
    procs.barrier()
    if procs.rank == 0:
        options = {
            **asdict(cfg),
            "model_info": info,
            "n_param_tensors": len(chosen),
            "n_param_values": n_values,
            "param_names": sorted(chosen),
            "processes": procs.world,
        }
        _merge_effort(folder, out, ds, options)
    return 0


def _effort_rows(
    cfg: EffortConfig, ds: Any, tokenizer: Any, model: Any, regex: str
) -> Callable[[int, int, Any], np.ndarray]:
    """The shard scorer: the effort of rows ``a..b-1``, 0 for a user without a sample."""

    def score(a: int, b: int, bar: Any) -> np.ndarray:
        rows = a + np.flatnonzero(ds.has_sample[a:b])
        samples = encode_users(
            tokenizer,
            ds,
            rows,
            cutoff_len=cfg.cutoff_len,
            train_on_inputs=lm_loss.labels_every_token(cfg.loss),
        )
        scores = np.zeros(b - a, np.float32)
        bar.update(b - a - rows.size)
        scores[rows - a] = score_samples(
            model,
            samples,
            pad_id=tokenizer.pad_token_id,
            batch_size=cfg.batch_size,
            params=regex or None,
            max_tokens=cfg.max_tokens,
            autocast=cfg.autocast,
            loss=cfg.loss,
            bar=bar,
        )
        return scores

    return score


def scoring_model(cfg: EffortConfig, device: str, ds: Any = None) -> tuple[Any, Any, dict]:
    """``(tokenizer, model, info)``: the base LLM with a fresh seeded LoRA (or ``cfg.adapter``),
    after ``cfg.warmup_steps`` warm-up steps (:func:`llm_bridge.finetune.warmup` on ``ds``'s
    training samples), in eval mode (deterministic: no LoRA dropout)."""
    tokenizer, model, info = lora_model(
        cfg.model,
        device=device,
        dtype=cfg.dtype,
        seed=cfg.seed,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        adapter=cfg.adapter,
    )
    if cfg.warmup_steps:
        t0 = time.perf_counter()
        warmup(
            model,
            tokenizer,
            ds,
            steps=cfg.warmup_steps,
            batch_size=cfg.warmup_batch_size,
            lr=cfg.warmup_lr,
            loss=cfg.loss,
            cutoff_len=cfg.cutoff_len,
            seed=cfg.seed,
        )
        info = {**info, "warmup_seconds": round(time.perf_counter() - t0, 3)}
    model.eval()
    return tokenizer, model, info


def _merge_effort(folder: Path, out: Path, ds: Any, options: dict) -> None:
    """Merge the shards into ``out`` when every row is scored; say what is missing otherwise."""
    merged = merge_shards(
        folder,
        out,
        ds,
        shard_kind=EFFORT_SHARD,
        kind="effort",
        options=options,
        extra={"loss": loss_text(options["loss"])},
    )
    if merged is None:
        report_missing("effort", folder, out, ds, shard_kind=EFFORT_SHARD)
        return
    m = read_manifest(merged)
    rate = ds.n_users / m["seconds"] if m["seconds"] else float("nan")
    print(
        f"effort: wrote {merged} ({ds.n_users} rows, {m['seconds']:.1f} s of scoring, "
        f"{rate:.1f} samples/s)"
    )


class BIGRec:
    """The BIGRec backend (:class:`llm_bridge.backend.Backend`)."""

    name = "bigrec"

    def effort(self, cfg: EffortConfig) -> int:
        """:func:`effort`."""
        return effort(cfg)

    def finetune(self, cfg: FinetuneConfig) -> int:
        """:func:`llm_bridge.finetune.run`."""
        return bigrec_finetune.run(cfg)

    def evaluate(self, cfg: EvaluateConfig) -> int:
        """:func:`llm_bridge.evaluate.run`."""
        return bigrec_evaluate.run(cfg)

    def user_reps(self, cfg: UserRepsConfig) -> int:
        """:func:`llm_bridge.user_reps.run`."""
        return bigrec_user_reps.run(cfg)


BIGREC = BIGRec()
