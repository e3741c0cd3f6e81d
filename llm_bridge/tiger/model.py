"""TIGER's sequence model: a small T5 over semantic-ID tokens (Rajput et al., NeurIPS 2023).

**Model.** transformers' ``T5ForConditionalGeneration`` built from a ``T5Config`` with TIGER's
sizes (d_model 128, 4 encoder + 4 decoder layers, 6 heads of d_kv 64, d_ff 1024, ReLU, dropout
0.1), randomly initialised under ``torch.manual_seed(init_seed)``. No tokenizer and nothing from
a hub: it is fed integer token ids directly.

**Vocabulary.** ``0`` pad (also the decoder start), ``1`` EOS, then one block of tokens per code
position: code ``c`` at position ``l`` is token ``2 + offset_l + c`` with
``offset_l = sum(codebook_sizes[:l])``.

**Samples** (the BIGRec samples of :mod:`llm_bridge.prompts`, in codes):

* input: the codes of the last ``max_history`` (20) history items, flattened, then EOS; a user
  with an empty history (a single train item) has the input ``[EOS]``;
* target: the next item's codes, then EOS;
* train: history = all train items but the last, target = the last train item; valid:
  history = all train items, target = the first valid item; test: history = train + valid.

TIGER's user-id token (hashed to 2,000 buckets in the paper) is dropped, as in cornac's
reimplementation, which cites GRID's ablation (no measurable effect).

**Functional forward.** :func:`encode`, :func:`cross_kv` and :func:`decode` are the same T5 as a
pure function of the parameter dict (``dict(model.named_parameters())``; eval mode, no
dropout), tested equal to the module. The constrained beam search uses it to compute each
user's cross-attention keys and values once for all its beams; the effort score uses it under
``torch.func.vmap`` (the module's mask helpers branch on tensor values, which vmap forbids).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch

from jaxrec.data import Dataset
from jaxrec.errors import UserError
from llm_bridge.runtime import reading

PAD, EOS, N_SPECIAL = 0, 1, 2
T5_SIZES = {
    "d_model": 128,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_heads": 6,
    "dropout_rate": 0.1,
    "feed_forward_proj": "relu",
}
CPU_THREADS = 1  # torch intra-op threads on CPU unless DEALREC_TORCH_THREADS says otherwise
THREADS_ENV = "DEALREC_TORCH_THREADS"
Sizes = Sequence[int] | np.ndarray  # codebook sizes, one per code position
Tensor: TypeAlias = torch.Tensor
Tape: TypeAlias = list | None  # the parameter uses of a forward (effort's)


def default_threads() -> int:
    """Torch intra-op threads for TIGER's fine-tune, evaluation and effort on CPU:
    ``$DEALREC_TORCH_THREADS`` or :data:`CPU_THREADS`. Not part of any reuse key: the thread
    count changes only the order of floating-point sums."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return CPU_THREADS
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{THREADS_ENV}={value!r}: expected a whole number >= 1")
    return int(value)


@contextlib.contextmanager
def cpu_threads(device: torch.device | str, n: int | None = None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads (default :func:`default_threads`) on a CPU device,
    then restore the count.

    The model is small (many small matmuls): on the shared 2-core machine one thread was about
    2x faster than two under load (``bench/tiger.py`` measures both side by side); on a quiet
    one, two threads fine-tune 1.5x faster (``DEALREC_TORCH_THREADS=2``)."""
    n = default_threads() if n is None else n
    old = torch.get_num_threads()
    if str(device).startswith("cpu") and n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- vocabulary
def level_offsets(codebook_sizes: Sizes) -> np.ndarray:
    """Token id of code 0 at each code position: ``2 + sum(codebook_sizes[:l])``."""
    sizes = np.asarray(codebook_sizes, dtype=np.int64)
    return N_SPECIAL + np.concatenate([[0], np.cumsum(sizes)[:-1]])


def vocab_size(codebook_sizes: Sizes) -> int:
    """Pad + EOS + one token per (position, code)."""
    return N_SPECIAL + int(sum(int(k) for k in codebook_sizes))


def item_tokens(codes: np.ndarray, codebook_sizes: Sizes) -> np.ndarray:
    """``[n_items + 1, L]`` int64 token ids of every item's codes; row ``i`` is item ``i`` (row 0,
    the padding item, is all PAD).

    Raises :class:`UserError` when a code is outside ``[0, codebook_sizes[l])``."""
    codes = np.asarray(codes, dtype=np.int64)
    sizes = np.asarray(codebook_sizes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != len(sizes):
        raise UserError(
            f"semantic IDs of shape {codes.shape} do not match codebook sizes {list(sizes)}"
        )
    if codes.min() < 0 or (codes >= sizes).any():
        raise UserError(f"semantic IDs outside [0, codebook_sizes) = {list(sizes)}")
    out = np.full((len(codes) + 1, len(sizes)), PAD, dtype=np.int64)
    out[1:] = codes + level_offsets(sizes)
    return out


def codes_digest(codes: np.ndarray, codebook_sizes: Sizes) -> dict:
    """Identity of a semantic-ID table, stored with a fine-tuned model and checked on load."""
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    sha = hashlib.sha256(repr(codes.shape).encode() + codes.tobytes()).hexdigest()
    return {
        "sha256": sha,
        "codebook_sizes": [int(k) for k in codebook_sizes],
        "n_items": int(codes.shape[0]),
    }


# ----------------------------------------------------------------------------- samples
def history_input(
    items: Sequence[int] | np.ndarray, tokens: np.ndarray, max_history: int
) -> list[int]:
    """Encoder input: the codes of the last ``max_history`` items, flattened, then EOS."""
    items = np.asarray(items, dtype=np.int64)[-max_history:] if max_history > 0 else []
    return [int(t) for t in tokens[items].reshape(-1)] + [EOS]


def target_tokens(item: int, tokens: np.ndarray) -> list[int]:
    """Decoder target: the item's codes, then EOS."""
    return [int(t) for t in tokens[int(item)]] + [EOS]


def user_samples(
    ds: Dataset, rows: Iterable[int], tokens: np.ndarray, max_history: int, split: str = "train"
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Encoded samples of the users on lines ``rows`` (see the module docstring).

    Args:
      ds: the dataset; rows: user rows; tokens: :func:`item_tokens`; max_history: items kept.
      split: ``"train"`` (last train item as target), ``"valid"`` (first valid item; users
        without one are skipped) or ``"test"`` (history train + valid, no target).
    Returns:
      ``(inputs: list of token lists, targets: [n, L + 1] int64 (empty for test), kept rows)``.
    """
    inputs, targets, kept = [], [], []
    for row in (int(r) for r in rows):
        train = ds.train[row]
        if split == "train":
            hist, target = train[:-1], (train[-1] if len(train) else None)
        elif split == "valid":
            hist, target = train, (ds.valid[row][0] if len(ds.valid[row]) else None)
        elif split == "test":
            hist, target = np.concatenate([train, ds.valid[row]]), -1
        else:
            raise UserError(f"split must be 'train', 'valid' or 'test', not {split!r}")
        if target is None:
            continue
        inputs.append(history_input(hist, tokens, max_history))
        if split != "test":
            targets.append(target_tokens(target, tokens))
        kept.append(row)
    width = tokens.shape[1] + 1
    return (
        inputs,
        np.asarray(targets, dtype=np.int64).reshape(-1, width),
        np.asarray(kept, np.int64),
    )


def prefix_samples(
    ds: Dataset, rows: Iterable[int], tokens: np.ndarray, max_history: int
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """``finetune.train_samples: prefixes``: every prefix of a user's train items predicts the
    next one, as the authors' TIGER code trains with ``--subseq`` (Linxyhaha/TransRec, commit
    04cb471, ``baselines/TIGER/data.py`` lines 263-285): for train items ``x_1..x_m`` with
    ``m >= 2``, the samples ``x_1..x_{i-1} -> x_i`` for ``i = 2..m`` (history cut to its last
    ``max_history`` items); a user with one train item gives none; valid items are not used.

    Departs from the paper's n-shot (one sample per user, :func:`user_samples`): a user weighs
    ``m - 1`` samples.

    Returns:
      ``(inputs, targets [n, L + 1] int64, the user row of each sample)``, users in ``rows``
      order, each user's prefixes shortest first.
    """
    inputs, targets, kept = [], [], []
    for row in (int(r) for r in rows):
        train = ds.train[row]
        for i in range(1, len(train)):
            inputs.append(history_input(train[:i], tokens, max_history))
            targets.append(target_tokens(train[i], tokens))
            kept.append(row)
    width = tokens.shape[1] + 1
    return (
        inputs,
        np.asarray(targets, dtype=np.int64).reshape(-1, width),
        np.asarray(kept, np.int64),
    )


def pad_inputs(
    inputs: list[list[int]], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [B, S]`` (PAD) and ``attention_mask [B, S]`` (int64)."""
    width = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[b, : len(x)] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------- module
def t5_config(codebook_sizes: Sizes, **sizes: Any) -> Any:
    """A ``T5Config`` with TIGER's sizes (``sizes`` overrides them, e.g. for tests)."""
    from transformers import T5Config  # here: keeps transformers out of `dealrec doctor`

    special = {"pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": PAD}
    options: dict[str, Any] = {**special, **T5_SIZES, **sizes}
    return T5Config(vocab_size=vocab_size(codebook_sizes), **options)


def build_model(
    codebook_sizes: Sizes, init_seed: int = 0, device: Any = "cpu", **sizes: Any
) -> Any:
    """A randomly initialised ``T5ForConditionalGeneration`` (``torch.manual_seed(init_seed)``)."""
    # here: keeps transformers out of `dealrec doctor`, which imports this module
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(init_seed)
    model = T5ForConditionalGeneration(t5_config(codebook_sizes, **sizes))
    return model.to(device)


def load_model(folder: str | Path, device: Any = "cpu") -> Any:
    """The model saved by ``save_pretrained`` in ``folder`` (local files only), eval mode."""
    # here: keeps transformers out of `dealrec doctor`, which imports this module
    from transformers import T5ForConditionalGeneration

    with reading(folder, "re-run `dealrec finetune --backend tiger` into this folder"):
        model = T5ForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- functional T5
@dataclass(frozen=True)
class Spec:
    """The shapes the functional forward needs (from a ``T5Config``)."""

    enc_layers: int
    dec_layers: int
    heads: int
    d_kv: int
    eps: float
    buckets: int
    max_distance: int
    scale_output: float

    @classmethod
    def of(cls, config: Any) -> Spec:
        scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", True) else 1.0
        return cls(
            config.num_layers,
            config.num_decoder_layers,
            config.num_heads,
            config.d_kv,
            config.layer_norm_epsilon,
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
            scale,
        )


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameter dict of the functional forward (detached; tied weights once)."""
    return {n: p.detach() for n, p in model.named_parameters()}


# Every parameter use in the functional forward goes through one of the helpers below. With a
# ``tape`` (a list) each appends ``(kind, name, saved, output)``: what the exact per-sample
# gradient of that parameter needs from the output's gradient (see llm_bridge.tiger.effort).
def _lin(p, name, x, tape=None):
    y = x @ p[name].T
    if tape is not None:
        tape.append(("linear", name, x.detach(), y))
    return y


def _norm(p, name, x, eps, tape=None):
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = p[name] * xhat
    if tape is not None:
        tape.append(("norm", name, xhat.detach(), y))
    return y


def _embed(p, ids, tape=None):
    e = p["shared.weight"][ids]
    if tape is not None:
        tape.append(("embed", "shared.weight", ids, e))
    return e


def _position_bias(p, name, batch, q_len, k_len, spec, bidirectional, q_start=0, tape=None):
    """T5's relative position bias ``[B, H, q_len, k_len]`` (expanded over the batch) for query
    positions from ``q_start``."""
    # here: keeps transformers out of `dealrec doctor`, which imports this module
    from transformers.models.t5.modeling_t5 import T5Attention

    table = p[name]
    ctx = torch.arange(q_start, q_start + q_len, device=table.device)[:, None]
    mem = torch.arange(k_len, device=table.device)[None, :]
    buckets = T5Attention._relative_position_bucket(
        mem - ctx,
        bidirectional=bidirectional,
        num_buckets=spec.buckets,
        max_distance=spec.max_distance,
    )
    bias = table[buckets].permute(2, 0, 1).expand(batch, -1, -1, -1)
    if tape is not None:
        tape.append(("bias", name, buckets, bias))
    return bias


def _heads(x, spec):
    """``[..., T, H*dk]`` -> ``[..., H, T, dk]``."""
    x = x.unflatten(-1, (spec.heads, spec.d_kv))
    return x.transpose(-2, -3)


def _attend(q, k, v, bias):
    """Softmax attention without scaling (T5) plus an additive bias; ``[..., T, H*dk]``."""
    w = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
    return (w @ v).transpose(-2, -3).flatten(-2)


def _key_mask(mask, dtype):
    """Additive mask ``[B, 1, 1, S]``: 0 on tokens, the dtype's minimum on padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _ffn(p, pre, h, spec, tape=None):
    x = _norm(p, pre + "layer_norm.weight", h, spec.eps, tape)
    x = torch.relu(_lin(p, pre + "DenseReluDense.wi.weight", x, tape))
    return h + _lin(p, pre + "DenseReluDense.wo.weight", x, tape)


def _self_attention(p, pre, h, spec, bias, past=None, tape=None):
    """Pre-norm self-attention block (``past``: cached ``(k, v)`` of earlier tokens); returns
    ``(h, (k, v))``."""
    x = _norm(p, pre + "layer_norm.weight", h, spec.eps, tape)
    q, k, v = (_heads(_lin(p, f"{pre}SelfAttention.{n}.weight", x, tape), spec) for n in "qkv")
    if past is not None:
        k, v = torch.cat([past[0], k], -2), torch.cat([past[1], v], -2)
    return h + _lin(p, pre + "SelfAttention.o.weight", _attend(q, k, v, bias), tape), (k, v)


def encode(
    p: dict, spec: Spec, input_ids: Tensor, attention_mask: Tensor, tape: Tape = None
) -> Tensor:
    """The encoder: ``[B, S, d]`` hidden states (after the final norm)."""
    h = _embed(p, input_ids, tape)
    b, s = input_ids.shape
    bias = _position_bias(
        p,
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        b,
        s,
        s,
        spec,
        True,
        tape=tape,
    ) + _key_mask(attention_mask, h.dtype)
    for i in range(spec.enc_layers):
        h, _ = _self_attention(p, f"encoder.block.{i}.layer.0.", h, spec, bias, tape=tape)
        h = _ffn(p, f"encoder.block.{i}.layer.1.", h, spec, tape)
    return _norm(p, "encoder.final_layer_norm.weight", h, spec.eps, tape)


def cross_kv(
    p: dict, spec: Spec, enc: Tensor, attention_mask: Tensor, tape: Tape = None
) -> tuple[list[tuple[Tensor, ...]], Tensor]:
    """Each decoder layer's cross-attention keys and values ``[B, H, S, dk]`` (computed once per
    user, shared by all its beams) and the additive encoder mask ``[B, 1, 1, S]``."""
    kv = [
        tuple(
            _heads(
                _lin(p, f"decoder.block.{i}.layer.1.EncDecAttention.{n}.weight", enc, tape), spec
            )
            for n in "kv"
        )
        for i in range(spec.dec_layers)
    ]
    return kv, _key_mask(attention_mask, enc.dtype)


def _causal(q_len, k_len, q_start, dtype, device):
    """Additive causal mask ``[q_len, k_len]`` for query positions from ``q_start``."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    return (k > q).to(dtype) * torch.finfo(dtype).min


def decode(
    p: dict,
    spec: Spec,
    dec_ids: Tensor,
    kv: list,
    cross_mask: Tensor,
    past: Tape = None,
    tape: Tape = None,
) -> tuple[Tensor, list]:
    """The decoder over new tokens ``dec_ids [B, W, T]`` (``W`` beams per user), optionally
    after cached earlier tokens.

    Args:
      p, spec: parameters and shapes; kv, cross_mask: :func:`cross_kv` of the ``B`` users.
      past: per layer ``(k, v) [B, W, H, t, dk]`` of the ``t`` earlier tokens, or ``None``.
      tape: a list to record parameter uses in (effort), or ``None``.
    Returns:
      ``(logits [B, W, T, V], past)`` with ``past`` now holding ``t + T`` tokens.
    """
    h = _embed(p, dec_ids, tape)
    b, w, t_new = dec_ids.shape
    t_old = 0 if past is None else past[0][0].shape[-2]
    bias = _position_bias(
        p,
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        b,
        t_new,
        t_old + t_new,
        spec,
        False,
        t_old,
        tape,
    )[:, None] + _causal(t_new, t_old + t_new, t_old, h.dtype, h.device)
    new_past = []
    for i in range(spec.dec_layers):
        pre = f"decoder.block.{i}.layer."
        h, cache = _self_attention(
            p, pre + "0.", h, spec, bias, None if past is None else past[i], tape
        )
        new_past.append(cache)
        x = _norm(p, pre + "1.layer_norm.weight", h, spec.eps, tape).reshape(b, w * t_new, -1)
        q = _heads(_lin(p, pre + "1.EncDecAttention.q.weight", x, tape), spec)
        att = _attend(q, kv[i][0], kv[i][1], cross_mask)
        h = h + _lin(p, pre + "1.EncDecAttention.o.weight", att, tape).reshape(b, w, t_new, -1)
        h = _ffn(p, pre + "2.", h, spec, tape)
    h = _norm(p, "decoder.final_layer_norm.weight", h, spec.eps, tape) * spec.scale_output
    return _lin(p, "shared.weight", h, tape), new_past


def sample_losses(
    p: dict,
    spec: Spec,
    input_ids: Tensor,
    attention_mask: Tensor,
    targets: Tensor,
    tape: Tape = None,
) -> Tensor:
    """``[B]`` loss of each sample alone: the mean token cross-entropy over its ``L + 1`` target
    tokens (codes and EOS), teacher-forced from the decoder start (pad) token; eval mode."""
    enc = encode(p, spec, input_ids, attention_mask, tape)
    kv, cross_mask = cross_kv(p, spec, enc, attention_mask, tape)
    start = torch.full_like(targets[:, :1], PAD)
    dec_in = torch.cat([start, targets[:, :-1]], 1)[:, None]
    logits, _ = decode(p, spec, dec_in, kv, cross_mask, tape=tape)
    ce = torch.nn.functional.cross_entropy(
        logits[:, 0].flatten(0, 1), targets.flatten(), reduction="none"
    )
    return ce.view(targets.shape).mean(1)
