"""``dealrec user-reps --backend tiger``: TF-DCon's LLM half for TIGER, one T5 vector per user.

A user's vector is the T5 encoder's last hidden state (after its final norm) over the user's
semantic-ID history, the input TIGER's effort and fine-tune build for the user's training sample
(:func:`llm_bridge.tiger.model.history_input` of all train items but the last, the last
``max_history`` of them, then EOS; a user with one train item or none has the input ``[EOS]``),
pooled by ``pooling``: the mean over the input's tokens (default) or the EOS token's state
(``last``). Eval mode (no dropout), no gradient; batches are length-bucketed and right-padded,
and padding is masked exactly, so a vector equals the one of a batch of one.

**Which T5.** By default the T5 at initialisation (:func:`~llm_bridge.tiger.model.build_model`
with ``init_seed``, TIGER's sizes): the state effort scores and the fine-tune starts from. The
user representations feed the selection, which comes before any fine-tune (the fine-tune trains
on the selection), and TIGER has no pre-trained checkpoint (the paper trains it from scratch);
BIGRec's vectors come likewise from its LLM before fine-tuning (the base model, no adapter).
``model`` names a fine-tuned model folder instead (``dealrec finetune --backend tiger``, checked
against the dataset and the semantic IDs like ``evaluate``'s), e.g. one trained on other users.

Departs from TF-DCon (Wu et al., 2024), whose LLM half is a pre-trained text LLM's view of the
users: a randomly initialised encoder is a random-feature map of the user's codes (users with
items that share code prefixes share tokens, so they get close vectors), with no learned
preference (docs/protocol.md).

Output, shards, ``--users A:B`` and ``--resume``: those of BIGRec's
:mod:`llm_bridge.user_reps` (kind ``llm_representation``, float32 ``[n_users, d_model]``
aligned to ``sequential_train.txt``; :mod:`llm_bridge.shards`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from jaxrec.data import Dataset, load_dataset, read_manifest
from jaxrec.errors import UserError
from llm_bridge.config import UserRepsConfig
from llm_bridge.runtime import resolve_device_dtype
from llm_bridge.shards import (
    existing_shards,
    length_batches,
    merge_shards,
    parse_users,
    plan,
    report_missing,
    score_shards,
    shard_folder,
)
from llm_bridge.tiger.evaluate import check_model_folder
from llm_bridge.tiger.finetune import load_codes
from llm_bridge.tiger.model import (
    T5_SIZES,
    Spec,
    build_model,
    codes_digest,
    cpu_threads,
    encode,
    history_input,
    item_tokens,
    load_model,
    pad_inputs,
    params_of,
)
from llm_bridge.user_reps import KIND, SHARD_KIND, check_config


def user_inputs(
    ds: Dataset, rows: Iterable[int], tokens: np.ndarray, max_history: int
) -> list[list[int]]:
    """The encoder input of each user on lines ``rows``: the codes of the last ``max_history``
    train items but the last, then EOS (the input of :func:`~llm_bridge.tiger.model.user_samples`
    with ``split="train"``; ``[EOS]`` for a user with fewer than two train items)."""
    return [history_input(ds.train[int(r)][:-1], tokens, max_history) for r in rows]


@torch.no_grad()
def embed(
    p: dict[str, torch.Tensor],
    spec: Spec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str = "mean",
) -> torch.Tensor:
    """``[B, d_model]`` float32 user vectors of a right-padded batch: the functional T5
    encoder's last hidden state (:func:`~llm_bridge.tiger.model.encode`, eval mode) averaged
    over each input's real tokens (``mean``) or taken at its last one, the EOS (``last``).

    Raises :class:`UserError` for another ``pooling``."""
    if pooling not in ("mean", "last"):
        raise UserError(f"pooling={pooling!r}: expected 'mean' or 'last'")
    hidden = encode(p, spec, input_ids, attention_mask).float()
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    last = attention_mask.long().sum(1) - 1  # right padding: the last real position
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


def embed_inputs(
    model: Any,
    inputs: list[list[int]],
    *,
    batch_size: int = 16,
    pooling: str = "mean",
    bar: Any = None,
) -> np.ndarray:
    """``[len(inputs), d_model]`` float32 vectors (:func:`embed`) in length-bucketed batches of
    at most ``batch_size`` users."""
    p, spec = params_of(model), Spec.of(model.config)
    device = next(model.parameters()).device
    out = np.zeros((len(inputs), model.config.d_model), dtype=np.float32)
    for idx in length_batches([len(x) for x in inputs], batch_size):
        ids, mask = pad_inputs([inputs[i] for i in idx], device)
        out[idx] = embed(p, spec, ids, mask, pooling).cpu().numpy()
        if bar is not None:
            bar.update(len(idx))
    return out


def _model(cfg: UserRepsConfig, ds: Dataset, codes: np.ndarray, sizes: list[int], device: Any):
    """``(model, what)``: the fine-tuned T5 of ``cfg.model`` (checked) or the one at init, in
    eval mode, and what the shards' settings record of it."""
    if cfg.model:
        record = check_model_folder(cfg.model, ds, codes, sizes)
        return load_model(cfg.model, device), {"model": cfg.model, "trained": record["settings"]}
    return build_model(sizes, cfg.init_seed, device).eval(), {"init_seed": cfg.init_seed}


def _rows(
    model: Any, ds: Dataset, tokens: np.ndarray, cfg: UserRepsConfig
) -> Callable[[int, int, Any], np.ndarray]:
    """The shard scorer: the vectors of rows ``a..b-1``."""

    def score(a: int, b: int, bar: Any) -> np.ndarray:
        inputs = user_inputs(ds, range(a, b), tokens, cfg.max_history)
        return embed_inputs(model, inputs, batch_size=cfg.batch_size, pooling=cfg.pooling, bar=bar)

    return score


def run(cfg: UserRepsConfig) -> int:
    """TIGER's ``dealrec user-reps``: the T5 vector of every user (or rows ``--users A:B``),
    sharded and resumable (:mod:`llm_bridge.shards`), merged into ``cfg.out`` when every row
    is done."""
    out = check_config(cfg)
    if cfg.max_history < 1:
        raise UserError(f"max_history must be >= 1, got {cfg.max_history}")
    ds = load_dataset(cfg.data)
    codes, sizes = load_codes(cfg.semantic_ids, ds)
    parse_users(cfg.users, ds.n_users)
    folder = shard_folder(out)
    existing_shards(folder, ds, shard_kind=SHARD_KIND)  # another dataset's: fail before work
    device, _ = resolve_device_dtype(cfg.device, "float32")
    model, what = _model(cfg, ds, codes, sizes, device)
    settings = {
        "dataset": ds.fingerprint(),
        "backend": "tiger",
        **what,
        "semantic_ids": codes_digest(codes, sizes),
        "max_history": cfg.max_history,
        "pooling": cfg.pooling,
        "t5": T5_SIZES if not cfg.model else None,
    }
    todo = plan(cfg.users, cfg.shard_size, cfg.resume, ds, folder, settings, shard_kind=SHARD_KIND)
    hidden = int(model.config.d_model)
    print(
        f"user-reps (tiger): rows {todo.start}..{todo.stop - 1} in {todo.n_shards} shards, "
        f"{cfg.pooling} pooling of the T5 encoder ({cfg.model or f'init seed {cfg.init_seed}'}; "
        f"{hidden} values)"
    )
    with cpu_threads(device):
        score_shards(
            todo.todo,
            _rows(model, ds, item_tokens(codes, sizes), cfg),
            folder=folder,
            ds=ds,
            shard_kind=SHARD_KIND,
            settings=settings,
            desc="user-reps (tiger)",
            unit="user",
            device=str(device),
        )
    merged = merge_shards(
        folder,
        out,
        ds,
        shard_kind=SHARD_KIND,
        kind=KIND,
        options={**asdict(cfg), "settings_of_model": what, "device": str(device)},
        extra={"backend": "tiger", "pooling": cfg.pooling, "hidden_size": hidden},
    )
    if merged is None:
        report_missing("user-reps (tiger)", folder, out, ds, shard_kind=SHARD_KIND, verb="done")
        return 0
    m = read_manifest(merged)
    print(f"user-reps (tiger): wrote {merged} ({ds.n_users} x {hidden}, {m['seconds']:.1f} s)")
    return 0
