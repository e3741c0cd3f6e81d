"""``dealrec user-reps``: TF-DCon's LLM half, one LLM embedding of every user's prompt.

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

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from jaxrec.data import load_dataset, read_manifest, save_scores
from jaxrec.errors import UserError
from llm_bridge.config import UserRepsConfig
from llm_bridge.effort import (
    _autocast,
    _dist,
    existing_shards,
    length_batches,
    merge_shards,
    parse_users,
    shard_folder,
    shard_path,
    shard_ranges,
)
from llm_bridge.model import position_ids, unwrap
from llm_bridge.prompts import collate, encode_sample, user_sample

KIND = "llm_representation"
SHARD_KIND = "llm-representation-shard"


def encode_prompts(tokenizer, dataset, rows, *, cutoff_len: int = 512) -> list[dict]:
    """The prompt (no response, no EOS) of each user's training sample, as token ids."""
    out = []
    for row in rows:
        sample = user_sample(dataset, int(row))
        history = sample[0] if sample else []  # no train item: the prompt without history
        out.append(encode_sample(tokenizer, history, None, cutoff_len=cutoff_len))
    return out


@torch.no_grad()
def embed(model, input_ids, attention_mask, pooling: str = "mean") -> torch.Tensor:
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
    model,
    samples: list[dict],
    *,
    pad_id: int,
    batch_size: int = 16,
    max_tokens: int = 0,
    pooling: str = "mean",
    autocast: str = "",
    bar=None,
) -> np.ndarray:
    """``[len(samples), H]`` float32 vectors (:func:`embed`) in length-bucketed batches of at
    most ``batch_size`` prompts and ``max_tokens`` padded tokens."""
    device = next(model.parameters()).device
    hidden = unwrap(model).config.hidden_size
    out = np.zeros((len(samples), hidden), dtype=np.float32)
    lengths = [len(s["input_ids"]) for s in samples]
    with _autocast(device, autocast):
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
    """``dealrec user-reps``: the LLM vector of every user's prompt (or rows ``--users A:B``),
    sharded, resumable, merged into ``cfg.out`` when every row is done."""
    from llm_bridge.model import load_tokenizer_and_model

    out = Path(cfg.out)
    if out.suffix != ".npy":
        raise UserError(f"{out}: the user-reps file name must end in .npy")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.pooling not in ("mean", "last"):
        raise UserError(f"pooling={cfg.pooling!r}: expected 'mean' or 'last'")
    ds = load_dataset(cfg.data)
    start, stop = parse_users(cfg.users, ds.n_users)
    folder = shard_folder(out)
    existing_shards(folder, ds, shard_kind=SHARD_KIND)  # another dataset's: fail before work
    rank, world, barrier, dist_device = _dist()
    device = str(dist_device) if cfg.device == "auto" and dist_device is not None else cfg.device
    tokenizer, model, info = load_tokenizer_and_model(cfg.model, device=device, dtype=cfg.dtype)
    settings = _settings(cfg, ds, info)
    done = existing_shards(folder, ds, settings, shard_kind=SHARD_KIND)
    units = shard_ranges(start, stop, cfg.shard_size)[rank::world]
    todo = [u for u in units if not (cfg.resume and u in done)]
    if rank == 0:
        n_shards = len(shard_ranges(start, stop, cfg.shard_size))
        print(
            f"user-reps: rows {start}..{stop - 1} in {n_shards} shards over {world} "
            f"process(es), {cfg.pooling} pooling of "
            f"{info['model']}'s last hidden state ({model.config.hidden_size} values)"
        )
    bar = tqdm(
        total=sum(b - a for a, b in todo),
        desc=f"user-reps[{rank}]" if world > 1 else "user-reps",
        unit="user",
        position=rank,
        dynamic_ncols=True,
    )
    for a, b in todo:
        t0 = time.perf_counter()
        samples = encode_prompts(tokenizer, ds, range(a, b), cutoff_len=cfg.cutoff_len)
        vectors = embed_samples(
            model,
            samples,
            pad_id=tokenizer.pad_token_id,
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
            pooling=cfg.pooling,
            autocast=cfg.autocast,
            bar=bar,
        )
        save_scores(
            shard_path(folder, a, b),
            vectors,
            kind=SHARD_KIND,
            dataset=ds.fingerprint(),
            seconds=time.perf_counter() - t0,
            rows=[a, b],
            settings=settings,
            device=info["device"],
        )
    bar.close()
    barrier()
    if rank != 0:
        return 0
    options = {**asdict(cfg), "model_info": info, "processes": world}
    merged = merge_shards(
        folder,
        out,
        ds,
        options=options,
        kind=KIND,
        shard_kind=SHARD_KIND,
        extra={"pooling": cfg.pooling, "hidden_size": int(model.config.hidden_size)},
    )
    if merged is None:
        n = sum(b - a for a, b in existing_shards(folder, ds, shard_kind=SHARD_KIND))
        print(
            f"user-reps: {n} of {ds.n_users} rows done in {folder}; {out} is written when all "
            "rows are (run the other --users ranges with the same --out)"
        )
        return 0
    m = read_manifest(merged)
    print(
        f"user-reps: wrote {merged} ({ds.n_users} x {model.config.hidden_size}, "
        f"{m['seconds']:.1f} s)"
    )
    return 0
