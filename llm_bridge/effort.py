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
``einsum("bto,bti->boi")`` and the "ghost norm" ``sum((X X^T) * (G G^T))`` is used. The
logits are computed only at the positions that carry a label. Parameters that are not the
weight or bias of an ``nn.Linear`` fall back to an exact per-sample autograd loop.

``dealrec effort`` scores every row of ``sequential_train.txt`` (or ``--users A:B``) in
length-bucketed batches, in shards of ``shard_size`` rows written atomically under
``OUT.shards/`` (a shard's ``.json`` manifest is its commit point), so ``--resume`` continues
after a kill with no sample lost or scored twice. Under ``accelerate launch`` each process
takes every ``world``-th shard; when all rows are covered, the shards are merged into ``OUT``
(float32, aligned to ``sequential_train.txt``) with a JSON manifest.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from jaxrec.data import load_dataset, load_scores, read_manifest, save_scores
from jaxrec.errors import ScoreFileError, UserError
from llm_bridge import loss as lm_loss
from llm_bridge.config import EffortConfig
from llm_bridge.model import position_ids, unwrap
from llm_bridge.prompts import collate, encode_users

SHARD_KIND = "effort-shard"


# ----------------------------------------------------------------------------- core
def loss_text(loss: str) -> str:
    """The manifest's description of the effort score under ``loss``."""
    return (
        f"{loss}: {lm_loss.DESCRIPTION[loss]}, as a batch of one; effort = L2 norm of its "
        "gradient w.r.t. the selected parameters (Eq. 12)"
    )


def scope_params(model, scope: str = "lora", params: str = "") -> str:
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


def select_params(model, params: str | None = None) -> dict[str, torch.nn.Parameter]:
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
    model, input_ids, attention_mask, labels, loss: str = "response-mean"
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
    covered, targets = set(), {}
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
        t, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
        if d_in * d_out <= t * t:  # explicit per-sample gradient [B, out, in]
            out = out + torch.einsum("bto,bti->boi", g, x).pow(2).sum((1, 2))
        else:  # ghost norm: <X X^T, G G^T>
            xx, gg = torch.bmm(x, x.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
            out = out + (xx * gg).sum((1, 2))
    if with_bias:
        out = out + g.sum(1).pow(2).sum(1)
    return out


MAX_TOKENS = 1024  # padded tokens per pass: on 2 CPU cores, larger passes got slower per sample


def per_sample_grad_norms(
    model,
    input_ids,
    attention_mask,
    labels,
    params=None,
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
    with _autocast(input_ids.device, autocast):
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


def _autocast(device: torch.device, autocast: str):
    if autocast not in ("", "bf16"):
        raise UserError(f"autocast={autocast!r}: expected '' (off) or 'bf16'")
    if not autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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


# ----------------------------------------------------------------------------- sharded CLI
def parse_users(spec: str, n_users: int) -> tuple[int, int]:
    """``"A:B"`` -> rows ``A..B-1`` (either side may be empty); ``""`` = all rows."""
    if not spec:
        return 0, n_users
    try:
        a, b = spec.split(":")
        start, stop = int(a or 0), int(b or n_users)
    except ValueError:
        raise UserError(f"--users {spec!r}: expected A:B (rows A..B-1)") from None
    if not 0 <= start < stop <= n_users:
        raise UserError(f"--users {spec}: need 0 <= A < B <= {n_users}")
    return start, stop


def shard_ranges(start: int, stop: int, shard_size: int) -> list[tuple[int, int]]:
    """The rows ``start..stop-1`` cut at multiples of ``shard_size`` (so shards of different
    ``--users`` ranges line up)."""
    if shard_size < 1:
        raise UserError(f"shard_size must be >= 1, got {shard_size}")
    cuts = sorted({start, stop, *range((start // shard_size + 1) * shard_size, stop, shard_size)})
    return list(zip(cuts[:-1], cuts[1:]))


def shard_folder(out: Path) -> Path:
    return out.with_name(out.name + ".shards")


def shard_path(folder: Path, a: int, b: int) -> Path:
    return folder / f"rows-{a:08d}-{b:08d}.npy"


def _settings(cfg: EffortConfig, ds, model_info: dict) -> dict:
    """What must match for shards to be combined."""
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


def existing_shards(
    folder: Path, ds, settings: dict | None = None, *, shard_kind: str = SHARD_KIND
) -> dict[tuple[int, int], Path]:
    """Committed shards in ``folder`` (their manifest exists) as ``{(a, b): path}``; the shards
    of ``shard_kind`` (effort's, or ``dealrec user-reps``').

    Raises :class:`UserError` (ScoreFileError) for a shard of another dataset or, when
    ``settings`` is given, made with other settings; nothing is written.
    """
    found = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("rows-*-*.npy")):
        if not path.with_suffix(".json").is_file():
            continue  # not committed (killed between the two writes)
        manifest = read_manifest(path)
        if manifest.get("kind") != shard_kind:
            raise ScoreFileError(
                f"{path}: kind is {manifest.get('kind')!r}, expected {shard_kind!r}"
            )
        if manifest.get("dataset") != ds.fingerprint():
            raise ScoreFileError(
                f"{path}: shard made from another dataset (fingerprint "
                f"mismatch); use another --out or remove {folder}"
            )
        if settings is not None and manifest.get("settings") != settings:
            diff = sorted(k for k in settings if manifest.get("settings", {}).get(k) != settings[k])
            raise UserError(
                f"{path}: shard made with other settings ({', '.join(diff)}); "
                f"use another --out or remove {folder}"
            )
        a, b = manifest["rows"]
        found[(int(a), int(b))] = path
    return found


def merge_shards(
    folder: Path,
    out: Path,
    ds,
    *,
    options: dict | None = None,
    extra: dict | None = None,
    kind: str = "effort",
    shard_kind: str = SHARD_KIND,
) -> Path | None:
    """Join the shards in ``folder`` into ``out`` (float32, one score, or one row of a
    ``[n, D]`` shard, per line of ``sequential_train.txt``) with its manifest of ``kind``,
    when they cover every row exactly once.

    Returns ``out``, or ``None`` (nothing written) when rows are missing.
    Raises :class:`UserError` when shards overlap or disagree on settings.
    """
    shards = existing_shards(folder, ds, shard_kind=shard_kind)
    scores = None
    covered = np.zeros(ds.n_users, dtype=np.int64)
    seconds, settings = 0.0, None
    for (a, b), path in sorted(shards.items()):
        arr, manifest = load_scores(path, kind=shard_kind, dataset=ds.fingerprint())
        if scores is None:
            scores = np.full((ds.n_users, *arr.shape[1:]), np.nan, dtype=np.float32)
        if arr.shape != (b - a, *scores.shape[1:]):
            raise ScoreFileError(f"{path}: shape {arr.shape}, expected ({b - a}, ...)")
        if settings is None:
            settings = manifest["settings"]
        elif manifest["settings"] != settings:
            raise UserError(f"{folder}: shards made with different settings; remove the folder")
        scores[a:b] = arr
        covered[a:b] += 1
        seconds += float(manifest.get("seconds") or 0.0)
    if (covered > 1).any():
        raise UserError(f"{folder}: row {int(np.flatnonzero(covered > 1)[0])} is in two shards")
    if (covered == 0).any():
        return None
    if kind == "effort" and "loss" in (settings or {}):
        extra = {"loss": loss_text(settings["loss"]), **(extra or {})}
    save_scores(
        out,
        scores,
        kind=kind,
        dataset=ds.fingerprint(),
        options={**(options or {}), "settings": settings},
        seconds=seconds,
        shards=len(shards),
        **(extra or {}),
    )
    return out


def length_batches(lengths, batch_size: int, max_tokens: int = 0) -> list[np.ndarray]:
    """Length bucketing: indices sorted by length, cut into batches of at most ``batch_size``
    samples and (when ``max_tokens > 0``) at most ``max_tokens`` padded tokens (a longer sample
    goes alone)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, cur = [], []
    for i in order:
        width = max(lengths[i], max((lengths[j] for j in cur), default=0))
        if cur and (len(cur) == batch_size or (max_tokens and width * (len(cur) + 1) > max_tokens)):
            batches.append(np.asarray(cur))
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(np.asarray(cur))
    return batches


def score_samples(
    model,
    samples: list[dict],
    *,
    pad_id: int,
    batch_size: int,
    params=None,
    max_tokens: int = 0,
    autocast: str = "",
    loss: str = "response-mean",
    bar=None,
) -> np.ndarray:
    """Effort of each encoded sample (length-bucketed batches, see :func:`length_batches`),
    float32.

    ``autocast="bf16"`` runs forward and backward under bfloat16 autocast (logits, loss and
    norms stay float32): about 3x faster on a CPU with AVX512-BF16, not exact (see
    ``docs/benchmarks.md`` for the measured deviation).
    """
    device = next(model.parameters()).device
    _autocast(device, autocast)  # a bad value fails before any work
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


def _dist():
    """``(rank, world, barrier, device)`` when launched with several processes (``accelerate
    launch`` / torchrun set ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``); one process otherwise.

    accelerate's own state is used where it sees the processes (GPUs); on a CPU-only machine it
    reports one process, so a gloo process group is set up from the launcher's environment.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, (lambda: None), None
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        return state.process_index, state.num_processes, state.wait_for_everyone, state.device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier, None


def main(cfg: EffortConfig) -> int:
    """``dealrec effort``: Eq. 12 for every user's sample (or rows ``--users A:B``), sharded,
    resumable, merged into ``cfg.out`` when every row is scored."""
    if cfg.backend == "tiger":
        from llm_bridge.tiger.effort import main as tiger_main

        return tiger_main(cfg)
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
    ds = load_dataset(cfg.data)
    start, stop = parse_users(cfg.users, ds.n_users)
    folder = shard_folder(out)
    existing_shards(folder, ds)  # another dataset's shards: fail before any work
    rank, world, barrier, dist_device = _dist()
    device = cfg.device
    if device == "auto" and dist_device is not None:
        device = str(dist_device)
    tokenizer, model, info = _scoring_model(cfg, device, ds)
    regex = scope_params(model, cfg.scope, cfg.params)
    chosen = select_params(model, regex or None)
    settings = _settings(cfg, ds, info)
    done = existing_shards(folder, ds, settings)
    units = shard_ranges(start, stop, cfg.shard_size)[rank::world]  # split before resuming
    todo = [u for u in units if not (cfg.resume and u in done)]
    if rank == 0:
        skipped = sum(b - a for a, b in units if cfg.resume and (a, b) in done)
        print(
            f"effort: rows {start}..{stop - 1} in "
            f"{len(shard_ranges(start, stop, cfg.shard_size))} shards over {world} "
            f"process(es); {len(chosen)} parameter tensors "
            f"({sum(p.numel() for p in chosen.values()):,} values)"
            + (f"; resuming, {skipped} rows of this process already scored" if skipped else "")
        )
    _score_shards(cfg, ds, tokenizer, model, todo, folder, settings, info, rank, world, regex)
    barrier()
    if rank != 0:
        return 0
    options = {
        **asdict(cfg),
        "model_info": info,
        "n_param_tensors": len(chosen),
        "n_param_values": int(sum(p.numel() for p in chosen.values())),
        "param_names": sorted(chosen),
        "processes": world,
    }
    _merge_and_report(folder, out, ds, options)
    return 0


def _scoring_model(cfg: EffortConfig, device: str, ds=None):
    """``(tokenizer, model, info)``: the base LLM with a fresh seeded LoRA (or ``cfg.adapter``),
    after ``cfg.warmup_steps`` warm-up steps (:func:`llm_bridge.finetune.warmup` on ``ds``'s
    training samples), in eval mode (deterministic: no LoRA dropout)."""
    from llm_bridge.model import add_lora, load_tokenizer_and_model

    tokenizer, model, info = load_tokenizer_and_model(cfg.model, device=device, dtype=cfg.dtype)
    torch.manual_seed(cfg.seed)  # the fresh LoRA's init
    model = add_lora(
        model,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        adapter=cfg.adapter,
        trainable=True,
    )
    if cfg.warmup_steps:
        from llm_bridge.finetune import warmup

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


def _score_shards(cfg, ds, tokenizer, model, todo, folder, settings, info, rank, world, regex):
    """Score each shard ``(a, b)`` of ``todo`` and commit it (atomic write + manifest)."""
    bar = tqdm(
        total=sum(b - a for a, b in todo),
        desc=f"effort[{rank}]" if world > 1 else "effort",
        unit="sample",
        position=rank,
        dynamic_ncols=True,
    )
    has_sample = ds.has_sample
    for a, b in todo:
        t0 = time.perf_counter()
        rows = a + np.flatnonzero(has_sample[a:b])  # a user without a sample scores 0
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
        save_scores(
            shard_path(folder, a, b),
            scores,
            kind=SHARD_KIND,
            dataset=ds.fingerprint(),
            seconds=time.perf_counter() - t0,
            rows=[a, b],
            settings=settings,
            batch_size=cfg.batch_size,
            device=info["device"],
        )
    bar.close()


def _merge_and_report(folder: Path, out: Path, ds, options: dict) -> None:
    merged = merge_shards(folder, out, ds, options=options)
    if merged is None:
        n = sum(b - a for a, b in existing_shards(folder, ds))
        print(
            f"effort: {n} of {ds.n_users} rows scored in {folder}; {out} is written when all "
            "rows are (run the other --users ranges with the same --out)"
        )
        return
    m = read_manifest(merged)
    rate = ds.n_users / m["seconds"] if m["seconds"] else float("nan")
    print(
        f"effort: wrote {merged} ({ds.n_users} rows, {m['seconds']:.1f} s of scoring, "
        f"{rate:.1f} samples/s)"
    )
