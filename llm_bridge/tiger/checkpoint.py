"""Checkpoints of the TIGER fine-tune (:mod:`llm_bridge.tiger.finetune`): the last finished
epoch's model (safetensors), optimizer, scheduler and RNG state, then ``state.json`` as the
commit point, so a killed fine-tune continues where it stopped with the same result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from jaxrec.data import write_json
from jaxrec.data.scorefiles import atomic_write_bytes
from llm_bridge.runtime import RESTART, read_json, reading


def _weights(model) -> dict[str, torch.Tensor]:
    """Parameters by name, tied weights once (safetensors refuses shared tensors)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}


def save_checkpoint(
    ckpt: Path,
    epoch: int,
    model: Any,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
) -> None:
    """Epoch-numbered model and optimizer files, then ``state.json`` (the commit point)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    blob = st_save(_weights(model))
    atomic_write_bytes(ckpt / f"model-{epoch}.safetensors", lambda f: f.write(blob))
    extra = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
    atomic_write_bytes(ckpt / f"optimizer-{epoch}.pt", lambda f: torch.save(extra, f))
    write_json(ckpt / "state.json", {**state, "epoch": epoch})
    for f in ckpt.iterdir():  # older epochs are no longer needed
        if f.name.startswith(("model-", "optimizer-")) and f.stem.split("-")[-1] != str(epoch):
            f.unlink(missing_ok=True)


def load_checkpoint(
    ckpt: Path, model: Any, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler
) -> dict:
    """Restore model, optimizer, scheduler and RNG state; returns ``state.json``."""
    state = read_json(ckpt / "state.json", RESTART)
    epoch = state["epoch"]
    device = next(model.parameters()).device
    with reading(ckpt / f"model-{epoch}.safetensors", RESTART):
        weights = load_file(str(ckpt / f"model-{epoch}.safetensors"), device=str(device))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
    with reading(ckpt / f"optimizer-{epoch}.pt", RESTART):
        extra = torch.load(ckpt / f"optimizer-{epoch}.pt", map_location=device, weights_only=True)
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"].cpu())
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in extra["cuda_rng"]])
    return state


__all__ = ["load_checkpoint", "save_checkpoint"]
