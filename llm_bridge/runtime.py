"""Helpers both backends share: device and dtype, autocast, train/eval mode, reading JSON and
checkpoint files with one-line errors.

Light to import (``dealrec doctor`` and the config-only commands import it): torch is imported
inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxrec.errors import UserError


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """``(torch.device, torch.dtype)``: auto = CUDA + bfloat16 when present, else CPU + float32."""
    import torch  # here: keeps torch out of `dealrec doctor`'s import of this module

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = (
            "bfloat16"
            if device.startswith("cuda") and torch.cuda.is_bf16_supported()
            else "float32"
        )
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise UserError(f"--dtype {dtype}: expected auto, {', '.join(dtypes)}")
    return torch.device(device), dtypes[dtype]


def autocast_context(device: Any, autocast: str) -> contextlib.AbstractContextManager:
    """The context of ``--autocast``: ``""`` = off (exact), ``"bf16"`` = bfloat16 autocast on
    ``device``'s type. Raises :class:`UserError` for another value (call it before any work)."""
    import torch  # here: keeps torch out of `dealrec doctor`'s import of this module

    if autocast not in ("", "bf16"):
        raise UserError(f"autocast={autocast!r}: expected '' (off) or 'bf16'")
    if not autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Eval mode (no dropout) inside the block; the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (anything else becomes its ``str``)."""
    return json.loads(json.dumps(obj, default=str))


# what to do about a damaged fine-tune checkpoint
RESTART = "start over with --no-resume (or delete the checkpoint folder)"


@contextlib.contextmanager
def reading(path: str | Path, remedy: str) -> Iterator[None]:
    """Inside the block, a failure to read ``path`` (missing, truncated, not valid JSON or
    safetensors, ...) becomes a one-line :class:`UserError` that names the file and
    ``remedy`` (what to do), instead of a library traceback. A :class:`UserError` passes."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"{e.filename or path}: missing; {remedy}") from None
    except Exception as e:  # noqa: BLE001 - any library's parse error of a damaged file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: damaged or unreadable ({detail}); {remedy}") from None


def read_json(path: str | Path, remedy: str) -> dict:
    """The JSON object in ``path``; a one-line :class:`UserError` (see :func:`reading`)."""
    with reading(path, remedy):
        value = json.loads(Path(path).read_text())
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
