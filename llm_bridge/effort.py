"""Effort scores (paper Eq. 12): the L2 norm of the LoRA gradient of every user's sample loss.

``effort(s) = || grad_theta L(s) ||_2`` with ``L(s)`` the LLM loss of the sample alone, chosen by
name (``loss=``, :mod:`llm_bridge.loss`: ``response-mean`` by default, ``response-sum`` = paper
Eq. 1, ``sequence-mean`` = the official code), and ``theta`` chosen by ``scope=``: every LoRA
parameter (``lora``, the default) or only the last decoder layer's ``self_attn.v_proj.lora_B``
(``official``: the official code's ``layers.31.self_attn.v_proj.lora_B`` of LLaMA-7B), or a
regex ``params=``.

The adapter is a fresh seeded LoRA by default, ``adapter=`` loads one (the official code loads
alpaca-lora-7B), and ``warmup_steps=`` first trains the LoRA for a few AdamW steps on seeded
random training samples. With a fresh LoRA ``lora_B`` is zero, so the gradient w.r.t.
``lora_A`` is zero and the norm is that of ``lora_B``'s gradient ``G^T X A^T``: a random
projection (by the seeded ``lora_A``) of the base weight's gradient (docs/benchmarks.md
measures how much the ranking depends on that seed).

The official code zeroes the gradients after every sample (``model.zero_grad()`` in its
``_inner_training_loop``) but back-propagates each sample's loss twice before reading
``.grad`` (``accelerator.backward(torch.mean(loss))`` in ``training_step``, then once more per
sample), so its scores are 2x the gradient norm (times fp16's constant loss scale where a
GradScaler is in the way): a constant factor that the min-max normalisation of ``prune.py``
removes. It also scores in train mode (LoRA dropout active) and
float16 with 8-bit base weights; here eval mode (deterministic) and the model's dtype.

**Exact per-sample norms of a padded batch in one backward pass.** Every LoRA factor is an
``nn.Linear`` ``y = x W^T (+ b)``. With the layer's per-sample input ``X_b [T, in]`` (pads
zeroed) and output gradient ``G_b [T, out]`` of ``sum_b L(s_b)`` (which, per sample, is the
gradient of that sample's own loss: samples do not interact), the per-sample weight gradient
is ``G_b^T X_b``; its squared Frobenius norm is summed over layers. Forward hooks record
``X``; one ``torch.autograd.grad`` of ``sum_b L(s_b)`` w.r.t. the recorded outputs gives ``G``
(no parameter gradient is formed or accumulated). Per layer the cheaper of the explicit
per-sample gradient and the "ghost norm" ``sum((X X^T) * (G G^T))`` is used
(:func:`llm_bridge.norms.linear_sq_norms`, one rule for both backends). The
logits are computed only at the positions that carry a label. Parameters that are not the
weight or bias of an ``nn.Linear`` fall back to an exact per-sample autograd loop.

``dealrec effort`` (:func:`main`) runs the effort of ``--backend`` (:mod:`llm_bridge.backend`);
BIGRec's (:func:`llm_bridge.bigrec.effort`) scores every row of ``sequential_train.txt`` (or
``--users A:B``) with :func:`score_samples` in length-bucketed batches, in shards of
``shard_size`` rows (:mod:`llm_bridge.shards`: atomic, resumable, one process or
``accelerate launch``), merged into ``OUT`` (float32, aligned to ``sequential_train.txt``)
with a JSON manifest.
"""

from __future__ import annotations

from typing import Any

import re

import numpy as np
import torch

from jaxrec.errors import UserError
from llm_bridge import loss as lm_loss
from llm_bridge.backend import get_backend
from llm_bridge.config import EffortConfig
from llm_bridge.model import position_ids, unwrap
from llm_bridge.norms import linear_sq_norms
from llm_bridge.prompts import collate
from llm_bridge.runtime import autocast_context
from llm_bridge.shards import (
    length_batches,
)


# ----------------------------------------------------------------------------- Eq. 12
def loss_text(loss: str) -> str:
    """The manifest's description of the effort score under ``loss``."""
    return (
        f"{loss}: {lm_loss.DESCRIPTION[loss]}, as a batch of one; effort = L2 norm of its "
        "gradient w.r.t. the selected parameters (Eq. 12)"
    )


def scope_params(model: Any, scope: str = "lora", params: str = "") -> str:
    """The parameter regex of ``scope`` (``""`` = every trainable parameter, i.e. all LoRA
    parameters); ``official`` = the last decoder layer's ``self_attn.v_proj.lora_B`` of a
    LLaMA-family model (the official code: ``layers.31`` of LLaMA-7B). A non-empty ``params``
    regex is used as it is and needs ``scope="lora"``."""
    if scope not in ("lora", "official"):
        raise UserError(f"scope={scope!r}: expected 'lora' or 'official'")
    if params:
        if scope != "lora":
            raise UserError(f"params={params!r} and scope={scope!r} both choose the parameters")
        return params
    if scope == "lora":
        return ""
    last = int(unwrap(model).config.num_hidden_layers) - 1
    return rf"\.layers\.{last}\.self_attn\.v_proj\.lora_B\."


def select_params(model: Any, params: str | None = None) -> dict[str, torch.nn.Parameter]:
    """The parameters the gradient is taken over: the trainable ones, or (``params`` a regex,
    ``re.search`` on the name) those whose name matches."""
    if params:
        pattern = re.compile(params)
        chosen = {n: p for n, p in model.named_parameters() if pattern.search(n)}
    else:
        chosen = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not chosen:
        raise UserError(
            f"no parameter matches {params!r}"
            if params
            else "the model has no trainable parameter (add a LoRA adapter first)"
        )
    return chosen


def _split_lm(model):
    """``(decoder, lm_head)`` of a (peft-wrapped) causal LM."""
    lm = unwrap(model)
    return lm.get_decoder(), lm.get_output_embeddings()


def per_sample_losses(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    loss: str = "response-mean",
) -> torch.Tensor:
    """``[B]`` loss of each sample alone (:func:`llm_bridge.loss.per_sample`: the mean, or for
    ``response-sum`` the sum, of the next-token cross-entropy over its own label tokens,
    ``labels != -100``, shifted by one as in transformers); 0 for a sample without label
    tokens. Positions come from the attention mask, so left or right padding gives each sample
    the result of a batch of one."""
    decoder, head = _split_lm(model)
    positions = position_ids(attention_mask)
    lengths = attention_mask.long().sum(-1, keepdim=True)
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    right_padded = bool(torch.equal(attention_mask.long(), (steps < lengths).long()))
    # Right padding: a real token never sees a later pad under the causal mask, so the plain
    # causal attention (no T x T mask; fused kernels) is exact for every real token.
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=None if right_padded else attention_mask,
        position_ids=positions,
        use_cache=False,
    ).last_hidden_state
    # a label is predicted from the previous real token (never from a left pad)
    rows, cols = lm_loss.label_positions(labels, attention_mask)
    picked = hidden[:, :-1][rows, cols]  # only where there is a label
    with torch.autocast(hidden.device.type, enabled=False):  # logits and loss in float32
        logits = head(picked.to(head.weight.dtype)).float()
    tok_loss = lm_loss.token_losses(logits, labels[:, 1:][rows, cols])
    return lm_loss.per_sample(tok_loss, rows, len(input_ids), loss)


def _linear_targets(model, chosen: dict):
    """``{module: (weight_selected, bias_selected)}`` for selected ``nn.Linear`` parameters and
    the names of selected parameters that are not part of an ``nn.Linear``."""
    ids = {id(p): n for n, p in chosen.items()}
    covered: set[str] = set()
    targets: dict = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = id(module.weight) in ids
            b = module.bias is not None and id(module.bias) in ids
            if w or b:
                targets[module] = (w, b)
                covered.update(ids[id(p)] for p, s in ((module.weight, w), (module.bias, b)) if s)
    return targets, [n for n in chosen if n not in covered]


def _sq_norm_linear(xs, gs, with_weight: bool, with_bias: bool) -> torch.Tensor:
    """``[B]`` squared norms of the per-sample gradients of one Linear from its inputs ``xs``
    and output gradients ``gs`` (lists over calls, concatenated along time)."""
    x = torch.cat(xs, 1).float()
    g = torch.cat(gs, 1).float()
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    out = torch.zeros(x.shape[0], device=x.device)
    if with_weight:
        out = out + linear_sq_norms(x, g)
    if with_bias:
        out = out + g.sum(1).pow(2).sum(1)
    return out


MAX_TOKENS = 1024  # padded tokens per pass: on 2 CPU cores, larger passes got slower per sample


def per_sample_grad_norms(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    params: str | None = None,
    *,
    max_tokens: int = MAX_TOKENS,
    autocast: str = "",
    loss: str = "response-mean",
) -> torch.Tensor:
    """Paper Eq. 12 for a padded batch: ``[B]`` exact L2 norms of each sample's own loss
    gradient (``loss`` of the sample alone, see :func:`per_sample_losses`) w.r.t. the
    model's trainable parameters, or those whose name matches the regex ``params``.

    The batch is cut by length into passes of at most ``max_tokens`` padded tokens (a longer
    sample goes alone; 0 = one pass), each with its own padding stripped, so a big batch is
    never slower per sample than a batch-1 loop. Each pass is one forward and one backward
    (hooks on the selected ``nn.Linear`` layers, see the module docstring).
    ``autocast="bf16"`` runs them under bfloat16 autocast (logits, loss and norms stay
    float32; not exact, see docs/benchmarks.md). The model's train/eval mode is kept (use
    eval mode for deterministic scores: LoRA dropout). No ``.grad`` is written;
    ``requires_grad`` flags are restored on return. A sample without label tokens scores 0.
    """
    lengths = attention_mask.long().sum(-1).tolist()
    out = torch.zeros(len(input_ids), device=input_ids.device)
    with autocast_context(input_ids.device, autocast):
        for idx in length_batches(lengths, len(lengths) or 1, max_tokens):
            rows = torch.as_tensor(idx, device=input_ids.device)
            cols = attention_mask[rows].bool().any(0)  # drop the pass's all-pad columns
            out[rows] = _grad_norms_pass(
                model,
                input_ids[rows][:, cols],
                attention_mask[rows][:, cols],
                labels[rows][:, cols],
                params,
                loss,
            ).to(out.dtype)
    return out


def _grad_norms_pass(
    model, input_ids, attention_mask, labels, params=None, loss: str = "response-mean"
) -> torch.Tensor:
    """:func:`per_sample_grad_norms` of one batch in one forward and one backward pass."""
    chosen = select_params(model, params)
    targets, others = _linear_targets(model, chosen)
    flags = {p: p.requires_grad for p in model.parameters()}
    records: dict = {m: ([], []) for m in targets}  # module -> (inputs, outputs)
    mask = attention_mask.to(torch.bool)

    def hook(module, args, output):
        x = args[0].detach()
        records[module][0].append(x * mask.view(*mask.shape, *([1] * (x.dim() - 2))).to(x.dtype))
        records[module][1].append(output)

    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in chosen.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            losses = per_sample_losses(model, input_ids, attention_mask, labels, loss)
            for h in handles:
                h.remove()
            sq = torch.zeros(len(input_ids), device=losses.device)
            outputs = [o for m in targets for o in records[m][1]]
            if outputs and losses.requires_grad:
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
                k = 0
                for m, (w, b) in targets.items():
                    n = len(records[m][1])
                    gs = [
                        torch.zeros_like(o) if g is None else g
                        for o, g in zip(records[m][1], grads[k : k + n])
                    ]
                    k += n
                    if n:
                        sq = sq + _sq_norm_linear(records[m][0], gs, w, b)
            records.clear()
            del outputs, losses
            if others:
                sq = sq + _loop_sq_norms(
                    model, input_ids, attention_mask, labels, [chosen[n] for n in others], loss
                )
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return sq.sqrt()


def _loop_sq_norms(
    model, input_ids, attention_mask, labels, params, loss: str = "response-mean"
) -> torch.Tensor:
    """Squared per-sample gradient norms w.r.t. ``params`` by one autograd call per sample
    (the fallback for parameters outside ``nn.Linear`` layers)."""
    out = torch.zeros(len(input_ids), device=input_ids.device)
    for b in range(len(input_ids)):
        keep = attention_mask[b].bool()
        value = per_sample_losses(
            model,
            input_ids[b : b + 1, keep],
            attention_mask[b : b + 1, keep],
            labels[b : b + 1, keep],
            loss,
        )[0]
        if value.requires_grad:
            grads = torch.autograd.grad(value, params, allow_unused=True)
            out[b] = sum(g.float().pow(2).sum() for g in grads if g is not None)
    return out


def score_samples(
    model: Any,
    samples: list[dict],
    *,
    pad_id: int,
    batch_size: int,
    params: str | None = None,
    max_tokens: int = 0,
    autocast: str = "",
    loss: str = "response-mean",
    bar: Any = None,
) -> np.ndarray:
    """Effort of each encoded sample (length-bucketed batches, see :func:`length_batches`),
    float32.

    ``autocast="bf16"`` runs forward and backward under bfloat16 autocast (logits, loss and
    norms stay float32): about 3x faster on a CPU with AVX512-BF16, not exact (see
    ``docs/benchmarks.md`` for the measured deviation).
    """
    device = next(model.parameters()).device
    autocast_context(device, autocast)  # a bad value fails before any work
    scores = np.zeros(len(samples), dtype=np.float32)
    for idx in length_batches([len(s["input_ids"]) for s in samples], batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in collate([samples[j] for j in idx], pad_id).items()}
        norms = per_sample_grad_norms(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            params=params,
            max_tokens=0,
            autocast=autocast,
            loss=loss,
        )
        scores[idx] = norms.float().cpu().numpy()
        if bar is not None:
            bar.update(len(idx))
    return scores


# ----------------------------------------------------------------------------- command
def main(cfg: EffortConfig) -> int:
    """``dealrec effort``: Eq. 12 of ``cfg.backend`` (:mod:`llm_bridge.backend`)."""
    return get_backend(cfg.backend).effort(cfg)
