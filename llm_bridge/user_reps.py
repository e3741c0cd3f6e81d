"""``dealrec user-reps``: TF-DCon's LLM half, one LLM embedding of every user's prompt (BIGRec;
TIGER's T5 vectors: :mod:`llm_bridge.tiger.user_reps`).

TF-DCon (Wu et al., 2024) condenses users on both the recommender's and the LLM's view of them;
``dealrec select --method tfdcon --llm-reps FILE`` clusters on the surrogate's user
representations and these. Each user's vector is the LLM's last hidden state (after the final
norm) over the prompt of the user's training sample (:func:`llm_bridge.prompts.build_prompt`
of all train titles but the last, the same prompt the fine-tune conditions on; no response),
pooled by ``pooling``: the mean over the prompt's tokens (default) or the last token's. The
base model, no adapter, eval mode: one forward pass per batch, no gradient.

Output ``OUT``: float32 ``[n_users, hidden]`` aligned to ``sequential_train.txt`` with a JSON
manifest of kind ``llm_representation`` (the dataset fingerprint, model, pooling, seconds).
Like ``dealrec effort``, rows are scored in shards of ``shard_size`` under ``OUT.shards/``
(atomic writes, a shard's manifest is its commit point), ``--users A:B`` does a part and
``--resume`` continues after a kill; under ``accelerate launch`` each process takes every
``world``-th shard. ``OUT`` is written when every row is covered.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from jaxrec.data import load_dataset, read_manifest
from jaxrec.errors import UserError
from llm_bridge.config import UserRepsConfig
from llm_bridge.backend import get_backend
from llm_bridge.model import load_tokenizer_and_model, position_ids, unwrap
from llm_bridge.runtime import autocast_context
from llm_bridge.shards import (
    existing_shards,
    length_batches,
    merge_shards,
    parse_users,
    plan,
    processes,
    report_missing,
    score_shards,
    shard_folder,
)
from llm_bridge.prompts import collate, encode_sample, user_sample

KIND = "llm_representation"
SHARD_KIND = "llm-representation-shard"


def encode_prompts(
    tokenizer: Any, dataset: Any, rows: Iterable[int], *, cutoff_len: int = 512
) -> list[dict]:
    """The prompt (no response, no EOS) of each user's training sample, as token ids."""
    out = []
    for row in rows:
        sample = user_sample(dataset, int(row))
        history = sample[0] if sample else []  # no train item: the prompt without history
        out.append(encode_sample(tokenizer, history, None, cutoff_len=cutoff_len))
    return out


@torch.no_grad()
def embed(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean"
) -> torch.Tensor:
    """``[B, H]`` float32 user vectors of a padded batch of prompts: the decoder's last hidden
    state pooled over each prompt's real tokens (``mean``) or taken at its last real token
    (``last``). Positions come from the attention mask, so either padding side gives each
    prompt the vector of a batch of one."""
    if pooling not in ("mean", "last"):
        raise UserError(f"pooling={pooling!r}: expected 'mean' or 'last'")
    decoder = unwrap(model).get_decoder()
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state.float()
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * steps).argmax(1)  # the last real position
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


def embed_samples(
    model: Any,
    samples: list[dict],
    *,
    pad_id: int,
    batch_size: int = 16,
    max_tokens: int = 0,
    pooling: str = "mean",
    autocast: str = "",
    bar: Any = None,
) -> np.ndarray:
    """``[len(samples), H]`` float32 vectors (:func:`embed`) in length-bucketed batches of at
    most ``batch_size`` prompts and ``max_tokens`` padded tokens."""
    device = next(model.parameters()).device
    hidden = unwrap(model).config.hidden_size
    out = np.zeros((len(samples), hidden), dtype=np.float32)
    lengths = [len(s["input_ids"]) for s in samples]
    with autocast_context(device, autocast):
        for idx in length_batches(lengths, batch_size, max_tokens):
            b = collate([samples[j] for j in idx], pad_id, "right")
            vec = embed(model, b["input_ids"].to(device), b["attention_mask"].to(device), pooling)
            out[idx] = vec.float().cpu().numpy()
            if bar is not None:
                bar.update(len(idx))
    return out


def _settings(cfg: UserRepsConfig, ds, info: dict) -> dict:
    """What must match for shards to be combined."""
    return {
        "dataset": ds.fingerprint(),
        "model": info["model"],
        "pooling": cfg.pooling,
        "cutoff_len": cfg.cutoff_len,
        "dtype": info["dtype"],
        "autocast": cfg.autocast,
    }


def main(cfg: UserRepsConfig) -> int:
    """``dealrec user-reps``: the user representations of ``cfg.backend``
    (:mod:`llm_bridge.backend`; TIGER's: :mod:`llm_bridge.tiger.user_reps`)."""
    return get_backend(cfg.backend).user_reps(cfg)


def check_config(cfg: UserRepsConfig) -> Path:
    """``cfg.out`` as a Path after the checks both backends share; :class:`UserError` for a
    bad option (before any work)."""
    out = Path(cfg.out)
    if out.suffix != ".npy":
        raise UserError(f"{out}: the user-reps file name must end in .npy")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.pooling not in ("mean", "last"):
        raise UserError(f"pooling={cfg.pooling!r}: expected 'mean' or 'last'")
    return out


def run(cfg: UserRepsConfig) -> int:
    """The LLM vector of every user's prompt (or rows ``--users A:B``), sharded and resumable
    (:mod:`llm_bridge.shards`), merged into ``cfg.out`` when every row is done."""
    out = check_config(cfg)
    ds = load_dataset(cfg.data)
    parse_users(cfg.users, ds.n_users)
    folder = shard_folder(out)
    existing_shards(folder, ds, shard_kind=SHARD_KIND)  # another dataset's: fail before work
    procs = processes()
    device = str(procs.device) if cfg.device == "auto" and procs.device is not None else cfg.device
    tokenizer, model, info = load_tokenizer_and_model(cfg.model, device=device, dtype=cfg.dtype)
    settings = _settings(cfg, ds, info)
    todo = plan(
        cfg.users,
        cfg.shard_size,
        cfg.resume,
        ds,
        folder,
        settings,
        shard_kind=SHARD_KIND,
        procs=procs,
    )
    if procs.rank == 0:
        print(
            f"user-reps: rows {todo.start}..{todo.stop - 1} in {todo.n_shards} shards over "
            f"{procs.world} process(es), {cfg.pooling} pooling of "
            f"{info['model']}'s last hidden state ({model.config.hidden_size} values)"
        )

    def score(a: int, b: int, bar: Any) -> np.ndarray:
        samples = encode_prompts(tokenizer, ds, range(a, b), cutoff_len=cfg.cutoff_len)
        return embed_samples(
            model,
            samples,
            pad_id=tokenizer.pad_token_id,
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
            pooling=cfg.pooling,
            autocast=cfg.autocast,
            bar=bar,
        )

    score_shards(
        todo.todo,
        score,
        folder=folder,
        ds=ds,
        shard_kind=SHARD_KIND,
        settings=settings,
        desc="user-reps",
        unit="user",
        procs=procs,
        device=info["device"],
    )
    procs.barrier()
    if procs.rank == 0:
        _merge(cfg, folder, out, ds, info, procs.world, int(model.config.hidden_size))
    return 0


def _merge(
    cfg: UserRepsConfig, folder: Path, out: Path, ds: Any, info: dict, world: int, hidden: int
) -> None:
    """Merge the shards into ``out`` when every row is done; say what is missing otherwise."""
    merged = merge_shards(
        folder,
        out,
        ds,
        shard_kind=SHARD_KIND,
        kind=KIND,
        options={**asdict(cfg), "model_info": info, "processes": world},
        extra={"pooling": cfg.pooling, "hidden_size": hidden},
    )
    if merged is None:
        report_missing("user-reps", folder, out, ds, shard_kind=SHARD_KIND, verb="done")
        return
    m = read_manifest(merged)
    print(f"user-reps: wrote {merged} ({ds.n_users} x {hidden}, {m['seconds']:.1f} s)")
