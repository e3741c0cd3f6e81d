"""Typed configs of the LLM-side subcommands (``effort``, ``finetune``, ``evaluate``).

The same machinery as :mod:`jaxrec.config`: defaults here, a section of a YAML file under
``configs/`` overrides them, command-line flags override both. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxrec.config import GAMES


@dataclass
class EffortConfig:
    """``dealrec effort``: paper Eq. 12, the LoRA gradient norm of every user's sample."""
    data: str = GAMES
    out: str = "runs/effort.npy"
    model: str = ""              # "" = embedded SmolLM2 GGUF; or a HF LLaMA folder / .gguf file
    adapter: str = ""            # start from an existing LoRA adapter
    params: str = ""             # regex on LoRA parameter names; "" = all LoRA parameters
    users: str = ""              # "A:B" = rows A..B-1 only (split work across processes)
    batch_size: int = 16
    cutoff_len: int = 512
    train_on_inputs: bool = False
    resume: bool = False
    shard_size: int = 1024
    device: str = "auto"         # auto | cpu | cuda
    dtype: str = "auto"          # auto | float32 | bfloat16
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 0


@dataclass
class FinetuneConfig:
    """``dealrec finetune``: BIGRec LoRA fine-tune on the selected users' samples."""
    data: str = GAMES
    selection: str = "runs/selected.npy"
    out: str = "runs/adapter"
    model: str = ""
    adapter: str = ""
    epochs: int = 50
    patience: int = 3
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 16
    cutoff_len: int = 512
    train_on_inputs: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    resume: bool = True


@dataclass
class EvaluateConfig:
    """``dealrec evaluate``: generation, grounding to items, Recall/NDCG@K."""
    data: str = GAMES
    adapter: str = ""            # "" = the base model without adapter
    model: str = ""
    split: str = "test"
    users: int = 0               # 0 = all users with items in the split; N = seeded subsample
    beams: int = 4
    max_new_tokens: int = 64
    batch_size: int = 8
    cutoff_len: int = 512
    out: str = "runs/metrics.json"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
