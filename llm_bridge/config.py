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
    params: str = ""             # regex (re.search) on parameter names; "" = all LoRA parameters
    users: str = ""              # "A:B" = rows A..B-1 only (split work across processes)
    batch_size: int = 16         # samples per batch (at most)
    max_tokens: int = 1024       # padded tokens per batch (at most; a longer sample goes alone); 0 = no cap; raise on a GPU
    cutoff_len: int = 512
    train_on_inputs: bool = False
    resume: bool = False
    shard_size: int = 1024       # rows per shard file under OUT.shards/ (the unit of --resume)
    device: str = "auto"         # auto | cpu | cuda
    dtype: str = "auto"          # auto | float32 | bfloat16
    autocast: str = ""           # "" = off (exact); "bf16" = bfloat16 autocast (faster, approximate)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 0                # seed of the fresh LoRA init (lora_B = 0: only lora_B's gradient is nonzero)


@dataclass
class FinetuneConfig:
    """``dealrec finetune``: BIGRec LoRA fine-tune on the selected users' samples."""
    data: str = GAMES
    selection: str = "runs/selected.npy"
    out: str = "runs/adapter"
    model: str = ""
    adapter: str = ""
    epochs: int = 50             # upper bound; early stopping on the valid-period loss
    patience: int = 3            # epochs without a lower valid loss before stopping
    fallback_epochs: int = 5     # fixed epochs when no selected user has a valid item
    lr: float = 1e-4
    batch_size: int = 8          # samples per forward/backward (micro-batch)
    grad_accum: int = 16         # micro-batches per optimizer step (8 x 16 = BIGRec's 128)
    cutoff_len: int = 512
    train_on_inputs: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    resume: bool = True          # continue from OUT/checkpoint if it was made with these settings


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
    out: str = "runs/metrics.json"  # predictions go beside it: NAME.predictions.jsonl
    cache_dir: str = "runs/cache"   # title embeddings of the base model, one .npy per model
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
