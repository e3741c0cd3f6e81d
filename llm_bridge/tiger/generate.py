"""Beam search over semantic IDs, constrained by a trie over all items (TIGER's inference).

**Trie as tensors.** For code position ``l`` the trie has one node per distinct ``l``-code
prefix of the catalogue (the root at ``l = 0``) and two tables ``[n_nodes_l, K_l]``:
``allowed[node, code]`` (some item continues the prefix with ``code``) and
``child[node, code]`` (the node of the longer prefix; at the last position, the item id). A beam
step gathers the allowed rows of its beams' nodes: no per-beam Python callback.

**Search** (deterministic; no sampling). Per user the encoder runs once and each decoder layer's
cross-attention keys/values are computed once and shared by all beams (see
:func:`llm_bridge.tiger.model.cross_kv`). At each of the ``L`` code positions every beam is
extended by every allowed code, scored by the full-vocabulary log-softmax of the decoder, and
the best ``beams`` extensions are kept. Every kept beam is a distinct prefix of a real item, so
the final beams are distinct real items. The search stops after the ``L``-th code: EOS (always
the next token in training) is neither generated nor scored, so an item's score is
``sum_l log p(code_l | input, codes_<l)`` over its codes. A step never has an empty allowed set
for a live beam (every trie node has a child); extensions that are not allowed get ``-inf``
without a softmax over them, so no NaN. With fewer allowed extensions than ``beams`` (a tiny
catalogue) the missing places are item 0 with score ``-inf``.

``cache=True`` keeps each beam's decoder self-attention keys/values (reordered with the beams)
and feeds only the new token; ``cache=False`` recomputes the (at most ``L``-token) decoder prefix
every step. Both give the same result; ``bench/tiger.py`` measures which is faster.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from llm_bridge.runtime import autocast_context

from llm_bridge.tiger.model import (
    PAD,
    Sizes,
    Spec,
    cross_kv,
    decode,
    encode,
    level_offsets,
    pad_inputs,
    params_of,
)


@dataclass
class Trie:
    """Per code position ``l``: ``allowed[l] [n_nodes_l, K_l]`` bool and ``child[l]`` int64
    (next node; at the last position the 1-based item id); ``offsets[l]`` = token of code 0."""

    allowed: list[torch.Tensor]
    child: list[torch.Tensor]
    offsets: list[int]
    sizes: list[int]

    def to(self, device: torch.device | str) -> Trie:
        """The same trie with its tables on ``device``."""
        return Trie(
            [a.to(device) for a in self.allowed],
            [c.to(device) for c in self.child],
            self.offsets,
            self.sizes,
        )


def build_trie(codes: np.ndarray, codebook_sizes: Sizes) -> Trie:
    """The trie over all items' code tuples.

    Args:
      codes: ``[n_items, L]`` codes; ``codes[j]`` is item ``j + 1``; rows unique.
      codebook_sizes: the number of values of each code position.
    Returns:
      the :class:`Trie` (on the CPU; :meth:`Trie.to` moves it).
    """
    codes = np.asarray(codes, dtype=np.int64)
    node, n_nodes = np.zeros(len(codes), dtype=np.int64), 1
    allowed, child = [], []
    last = len(codebook_sizes) - 1
    for l, k in enumerate(int(s) for s in codebook_sizes):
        key = node * k + codes[:, l]
        uniq, nxt = np.unique(key, return_inverse=True)
        ok = np.zeros(n_nodes * k, dtype=bool)
        ok[uniq] = True
        nodes = np.zeros(n_nodes * k, dtype=np.int64)
        nodes[key] = np.arange(1, len(codes) + 1) if l == last else nxt
        allowed.append(torch.from_numpy(ok.reshape(n_nodes, k)))
        child.append(torch.from_numpy(nodes.reshape(n_nodes, k)))
        node, n_nodes = nxt.reshape(-1), len(uniq)
    return Trie(
        allowed,
        child,
        [int(o) for o in level_offsets(codebook_sizes)],
        [int(s) for s in codebook_sizes],
    )


def _extend(scores, nodes, logp, trie: Trie, l: int, beams: int):
    """One beam step at code position ``l``.

    Args:
      scores, nodes: ``[B, W]`` beam log-probs and trie nodes; logp ``[B, W, V]`` log-softmax.
    Returns:
      ``(scores, parent, code, child)`` of the best ``min(beams, W * K_l)`` extensions
      ``[B, W']``, best first; extensions that are not allowed score ``-inf``.
    """
    k = trie.sizes[l]
    level = logp[..., trie.offsets[l] : trie.offsets[l] + k]
    cand = torch.where(
        trie.allowed[l][nodes],
        scores[..., None] + level,
        torch.tensor(float("-inf"), dtype=logp.dtype, device=logp.device),
    )
    top, idx = cand.flatten(1).topk(min(beams, cand.shape[1] * k), dim=1)
    parent, code = idx // k, idx % k
    child = trie.child[l][nodes.gather(1, parent), code]
    return top, parent, code, child


def _reorder(past, parent):
    """Each layer's cached ``(k, v) [B, W, ...]`` gathered along the beams by ``parent``
    ``[B, W']`` (one ``index_select`` on the flattened ``B * W`` rows: a plain copy, about 2x
    faster on CPU than advanced indexing)."""
    b, w = parent.shape[0], past[0][0].shape[1]
    flat = (torch.arange(b, device=parent.device)[:, None] * w + parent).reshape(-1)

    def pick(x):
        return x.flatten(0, 1).index_select(0, flat).unflatten(0, parent.shape)

    return [(pick(k), pick(v)) for k, v in past]


@torch.no_grad()
def beam_search(
    p: dict[str, torch.Tensor],
    spec: Spec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: Trie,
    beams: int = 20,
    cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trie-constrained beam search for a batch of users (see the module docstring).

    Args:
      p, spec: the model's parameters and shapes (:func:`llm_bridge.tiger.model.params_of`).
      input_ids, attention_mask: ``[B, S]`` encoder inputs; trie: :func:`build_trie` on the
        same device.
      beams: beam width = number of items returned; cache: decoder self-attention cache.
    Returns:
      ``(items [B, beams] int64, scores [B, beams] float)``, best first; item 0 / ``-inf`` pad
      the places no real item fills.
    """
    enc = encode(p, spec, input_ids, attention_mask)
    kv, cross_mask = cross_kv(p, spec, enc, attention_mask)
    b = input_ids.shape[0]
    seq = torch.full((b, 1, 1), PAD, dtype=torch.long, device=input_ids.device)
    scores = torch.zeros((b, 1), dtype=enc.dtype, device=enc.device)
    nodes = torch.zeros((b, 1), dtype=torch.long, device=enc.device)
    past = None
    for l in range(len(trie.sizes)):
        logits, new_past = decode(p, spec, seq[..., -1:] if cache else seq, kv, cross_mask, past)
        logp = torch.log_softmax(logits[:, :, -1].float(), dim=-1)
        scores, parent, code, nodes = _extend(scores, nodes, logp, trie, l, beams)
        rows = torch.arange(b, device=seq.device)[:, None]
        token = (code + trie.offsets[l])[..., None]
        seq = torch.cat([seq[rows, parent], token], -1)
        past = _reorder(new_past, parent) if cache else None
    items = torch.where(torch.isfinite(scores), nodes, torch.zeros_like(nodes))
    if items.shape[1] < beams:  # fewer items than beams in the whole catalogue
        fill = beams - items.shape[1]
        items = torch.cat([items, items.new_zeros(b, fill)], 1)
        scores = torch.cat([scores, scores.new_full((b, fill), float("-inf"))], 1)
    return items, scores


def generate(
    model: Any,
    inputs: list[list[int]],
    trie: Trie,
    *,
    beams: int = 20,
    batch_size: int = 64,
    cache: bool = True,
    desc: str | None = "beam search",
    autocast: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``beams`` items of every input (batched by input length, progress bar).

    Args:
      model: a ``T5ForConditionalGeneration`` (its current parameters are used, eval mode).
      inputs: encoder token lists (:func:`llm_bridge.tiger.model.user_samples`).
      autocast: ``""`` (float32, exact) or ``"bf16"``: the matrix products under bfloat16
        autocast (the log-softmax and the beam scores stay float32).
    Returns:
      ``(items [n, beams] int64 ndarray, scores [n, beams] float32 ndarray)`` in input order.
    """

    p, spec = params_of(model), Spec.of(model.config)
    device = next(model.parameters()).device
    trie = trie.to(device)
    order = np.argsort([len(x) for x in inputs], kind="stable")
    items = np.zeros((len(inputs), beams), dtype=np.int64)
    scores = np.zeros((len(inputs), beams), dtype=np.float32)
    bar = tqdm(total=len(inputs), desc=desc, unit="user", disable=desc is None)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad_inputs([inputs[r] for r in rows], device)
        with autocast_context(device, autocast):
            top, logp = beam_search(p, spec, ids, mask, trie, beams, cache)
        items[rows], scores[rows] = top.cpu().numpy(), logp.float().cpu().numpy()
        bar.update(len(rows))
    bar.close()
    return items, scores
