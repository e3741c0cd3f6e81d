"""``dealrec effort --backend tiger``: paper Eq. 12 for TIGER, the gradient norm of every user's
training-sample loss w.r.t. ALL T5 parameters at their initial state.

``effort(s) = || grad_phi L(s) ||_2`` where ``phi`` is every parameter of the randomly
initialised T5 (:func:`llm_bridge.tiger.model.build_model` with ``init_seed = cfg.seed``: the
state fine-tuning starts from with ``init_seed`` equal to it; tied embeddings counted once) and
``L(s)`` is the sample's own loss: the mean token cross-entropy over its 5 target tokens (the
last train item's 4 codes and EOS) given the codes of the last ``max_history`` (20) earlier items.
Dropout is off (eval mode), so scores are deterministic.

**Exact and batched, one forward and one backward per batch.** The T5 is written as a pure
function of its parameters (:func:`llm_bridge.tiger.model.sample_losses`) that records every
parameter use. One ``torch.autograd.grad`` of ``sum_b L(s_b)`` w.r.t. the recorded outputs gives
each sample its own output gradients, from which every parameter's per-sample gradient norm
follows exactly (:func:`grad_norms`); no per-sample gradient of the 4.6M parameters is stored.
Batches are length-bucketed and right-padded (padding is masked exactly: masked keys get
softmax weight 0). Tested equal to a batch-1 autograd loop on the ``transformers`` module
(:func:`loop_grad_norms`) to 1e-4 relative, and to ``torch.func.vmap(grad)``
(:func:`vmap_grad_norms`).

Sharding, ``--users A:B`` and ``--resume`` are those of :mod:`llm_bridge.shards`: shards of
``shard_size`` rows under ``OUT.shards/`` (a shard's manifest is its commit point), merged into
``OUT`` (float32, aligned to ``sequential_train.txt``) when every row is scored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.func import grad, vmap

from jaxrec.data import Dataset, load_dataset, read_manifest
from jaxrec.errors import UserError
from llm_bridge.config import EffortConfig
from llm_bridge.norms import linear_sq_norms
from llm_bridge.runtime import resolve_device_dtype
from llm_bridge.shards import (
    EFFORT_SHARD,
    length_batches,
    merge_shards,
    plan,
    report_missing,
    score_shards,
    shard_folder,
)
from llm_bridge.tiger.finetune import load_codes
from llm_bridge.tiger.model import (
    T5_SIZES,
    Spec,
    build_model,
    codes_digest,
    cpu_threads,
    item_tokens,
    pad_inputs,
    sample_losses,
    user_samples,
)

LOSS = (
    "TIGER: per sample, mean token cross-entropy over its 5 target tokens (4 codes + EOS), "
    "eval mode; effort = L2 norm of its gradient w.r.t. all T5 parameters at init (Eq. 12)"
)


# ----------------------------------------------------------------------------- core
def _tape_sq_norms(tape, grads, p: dict, batch: int) -> torch.Tensor:
    """``[B]`` squared per-sample gradient norms from the recorded parameter uses and the
    gradients of their outputs; the tied embedding (encoder, decoder, output layer) is summed
    per sample before its norm is taken."""
    vocab, d = p["shared.weight"].shape
    shared = p["shared.weight"].new_zeros(batch, vocab, d)
    sq = shared.new_zeros(batch)
    for (kind, name, saved, out), g in zip(tape, grads):
        g = torch.zeros_like(out) if g is None else g
        g = g.reshape(batch, -1, g.shape[-1]) if kind != "bias" else g
        if kind == "embed":
            rows = saved.reshape(batch, -1) + vocab * torch.arange(batch, device=g.device)[:, None]
            shared.view(-1, d).index_add_(0, rows.flatten(), g.reshape(-1, d))
        elif kind == "linear" and name == "shared.weight":
            shared += torch.bmm(g.transpose(1, 2), saved.reshape(batch, -1, d))
        elif kind == "linear":
            sq += linear_sq_norms(saved.reshape(batch, -1, saved.shape[-1]), g)
        elif kind == "norm":
            sq += (g * saved.reshape(g.shape)).sum(1).pow(2).sum(1)
        else:  # relative position bias table [buckets, H]
            table = g.new_zeros(batch, p[name].shape[0], g.shape[1])
            table.index_add_(1, saved.flatten(), g.flatten(2).transpose(1, 2))
            sq += table.pow(2).sum((1, 2))
    return sq + shared.pow(2).sum((1, 2))


def grad_norms(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Paper Eq. 12 for a padded batch: ``[B]`` exact L2 norms of each sample's own loss
    gradient w.r.t. every parameter of ``model`` (eval mode), in one forward and one backward.

    The functional forward records each parameter use (its input and output); one
    ``torch.autograd.grad`` of ``sum_b L(s_b)`` w.r.t. the outputs gives, row by row, each
    sample's own output gradients (samples do not interact; padding gets exactly zero), from
    which each parameter's per-sample gradient norm follows exactly (:func:`_tape_sq_norms`).
    No parameter gradient is formed.

    Args:
      model: the ``T5ForConditionalGeneration``.
      input_ids, attention_mask: ``[B, S]`` right-padded encoder inputs
        (:func:`~llm_bridge.tiger.model.pad_inputs`); targets: ``[B, L + 1]`` target tokens.
    Returns:
      ``[B]`` gradient norms (the model's dtype).
    """
    p = {n: q.detach().requires_grad_() for n, q in model.named_parameters()}
    spec, tape = Spec.of(model.config), cast(list, [])
    with torch.enable_grad():
        losses = sample_losses(p, spec, input_ids, attention_mask, targets, tape)
        names = [(kind, name) for kind, name, *_ in tape if name != "shared.weight"]
        assert len(names) == len(set(names)), "a parameter is used twice: norms would not add"
        grads = torch.autograd.grad(losses.sum(), [rec[3] for rec in tape], allow_unused=True)
    with torch.no_grad():
        return _tape_sq_norms(tape, grads, p, len(input_ids)).sqrt()


def vmap_grad_norms(
    p: dict[str, torch.Tensor],
    spec: Spec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """The norms of :func:`grad_norms` by ``torch.func.vmap(grad(...))`` (every per-sample
    gradient materialised; slower, kept as a second exact reference).

    Args:
      p, spec: the parameters and shapes (:func:`~llm_bridge.tiger.model.params_of`,
        :class:`~llm_bridge.tiger.model.Spec`); the rest as :func:`grad_norms`.
    Returns:
      ``[B]`` gradient norms.
    """

    def loss(params, ids, mask, tgt):
        return sample_losses(params, spec, ids[None], mask[None], tgt[None])[0]

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(p, input_ids, attention_mask, targets)
    return sum(g.pow(2).flatten(1).sum(1) for g in grads.values()).sqrt()


def loop_grad_norms(model: Any, inputs: list[list[int]], targets: np.ndarray) -> np.ndarray:
    """The baseline: one autograd call per sample on the ``transformers`` module (eval mode,
    unpadded input), norm over ``model.parameters()``.

    Args:
      model: the ``T5ForConditionalGeneration``; inputs: encoder token lists; targets:
        ``[n, L + 1]`` target tokens.
    Returns:
      ``[n]`` float32 gradient norms.
    """
    model.eval()
    params = list(model.parameters())
    device = params[0].device
    out = np.zeros(len(inputs), dtype=np.float32)
    for i, x in enumerate(inputs):
        ids = torch.as_tensor([x], device=device)
        tgt = torch.as_tensor(np.asarray(targets[i])[None], device=device)
        grads = torch.autograd.grad(model(input_ids=ids, labels=tgt).loss, params)
        out[i] = float(torch.sqrt(cast(torch.Tensor, sum(g.pow(2).sum() for g in grads))))
    return out


def score_samples(
    model: Any,
    inputs: list[list[int]],
    targets: np.ndarray,
    *,
    batch_size: int = 32,
    bar: Any = None,
) -> np.ndarray:
    """Effort (Eq. 12) of each sample, in length-bucketed batches (:func:`grad_norms`).

    Args:
      model: the ``T5ForConditionalGeneration`` (put in eval mode); inputs, targets: the
        samples (:func:`~llm_bridge.tiger.model.user_samples`); batch_size: the most samples
        of a batch; bar: a progress bar advanced by the samples scored.
    Returns:
      ``[n]`` float32 efforts, in input order.
    """
    model.eval()
    device = next(model.parameters()).device
    scores = np.zeros(len(inputs), dtype=np.float32)
    for idx in length_batches([len(x) for x in inputs], batch_size):
        ids, mask = pad_inputs([inputs[i] for i in idx], device)
        tgt = torch.as_tensor(np.asarray(targets)[idx], device=device)
        scores[idx] = grad_norms(model, ids, mask, tgt).float().cpu().numpy()
        if bar is not None:
            bar.update(len(idx))
    return scores


# ----------------------------------------------------------------------------- command
def _check(cfg: EffortConfig) -> Path:
    """``cfg.out`` as a Path; :class:`UserError` for a bad option (before any work)."""
    out = Path(cfg.out)
    if out.suffix != ".npy":
        raise UserError(f"{out}: the effort file name must end in .npy")
    if cfg.batch_size < 1 or cfg.max_history < 1:
        raise UserError(
            f"batch_size and max_history must be >= 1, got {cfg.batch_size}, {cfg.max_history}"
        )
    return out


def _rows_scorer(
    model: Any, ds: Dataset, tokens: np.ndarray, cfg: EffortConfig
) -> Callable[[int, int, Any], np.ndarray]:
    """The shard scorer: the effort of rows ``a..b-1``, 0 for a user without a train item."""

    def score(a: int, b: int, bar: Any) -> np.ndarray:
        inputs, targets, kept = user_samples(ds, range(a, b), tokens, cfg.max_history, "train")
        scores = np.zeros(b - a, np.float32)
        bar.update(b - a - len(kept))
        scores[kept - a] = score_samples(model, inputs, targets, batch_size=cfg.batch_size, bar=bar)
        return scores

    return score


def run(cfg: EffortConfig) -> int:
    """TIGER's ``dealrec effort``: Eq. 12 for every user's sample (or rows ``--users A:B``),
    sharded and resumable (:mod:`llm_bridge.shards`), merged into ``cfg.out`` when every row
    is scored."""
    out = _check(cfg)
    ds = load_dataset(cfg.data)
    codes, sizes = load_codes(cfg.semantic_ids, ds)
    folder = shard_folder(out)
    settings = {
        "dataset": ds.fingerprint(),
        "backend": "tiger",
        "init_seed": cfg.seed,
        "semantic_ids": codes_digest(codes, sizes),
        "max_history": cfg.max_history,
        "t5": T5_SIZES,
    }
    todo = plan(
        cfg.users, cfg.shard_size, cfg.resume, ds, folder, settings, shard_kind=EFFORT_SHARD
    )
    print(
        f"effort (tiger): rows {todo.start}..{todo.stop - 1} in {todo.n_shards} shards"
        + (f"; resuming, {todo.skipped} rows already scored" if todo.skipped else "")
    )
    device, _ = resolve_device_dtype(cfg.device, "float32")
    model = build_model(sizes, cfg.seed, device).eval()  # phi at init; dropout off
    with cpu_threads(device):
        score_shards(
            todo.todo,
            _rows_scorer(model, ds, item_tokens(codes, sizes), cfg),
            folder=folder,
            ds=ds,
            shard_kind=EFFORT_SHARD,
            settings=settings,
            desc="effort (tiger)",
            batch_size=cfg.batch_size,
            device=str(device),
        )
    n_params = sum(p.numel() for p in model.parameters())
    options = {
        **asdict(cfg),
        "backend": "tiger",
        "loss": LOSS,
        "n_param_values": n_params,
        "semantic_ids_digest": settings["semantic_ids"],
        "device": str(device),
    }
    _merge(folder, out, ds, options, n_params)
    return 0


def _merge(folder: Path, out: Path, ds: Dataset, options: dict, n_params: int) -> None:
    """Merge the shards into ``out`` when every row is scored; say what is missing otherwise."""
    merged = merge_shards(
        folder,
        out,
        ds,
        shard_kind=EFFORT_SHARD,
        kind="effort",
        options=options,
        extra={"loss": LOSS},
    )
    if merged is None:
        report_missing("effort (tiger)", folder, out, ds, shard_kind=EFFORT_SHARD)
        return
    m = read_manifest(merged)
    print(
        f"effort (tiger): wrote {merged} ({ds.n_users} rows, {m['seconds']:.1f} s of "
        f"scoring, {n_params:,} parameters)"
    )
