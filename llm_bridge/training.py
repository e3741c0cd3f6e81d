"""What both backends' fine-tunes share: the selection check, the users that early-stop,
the options added since checkpoints were made, the checks of a checkpoint to resume, and saving
the best model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.errors import UserError
from jaxrec.pipeline import at_since_default
from llm_bridge.config import FinetuneConfig
from llm_bridge.runtime import RESTART, read_json


def check_selection(
    selection: np.ndarray, n_users: int, path: str | Path = "selection"
) -> np.ndarray:
    """Validate a selection (user rows of ``sequential_train.txt``) and return it as int64.

    Raises :class:`UserError` for a non-integer or non-1-D array, an empty selection, a row
    outside ``0..n_users-1`` or a repeated row.
    """
    selection = np.asarray(selection)
    if selection.ndim != 1 or not np.issubdtype(selection.dtype, np.integer):
        raise UserError(
            f"{path}: a selection must be a 1-D integer array, got "
            f"{selection.dtype} of shape {selection.shape}"
        )
    if selection.size == 0:
        raise UserError(f"{path}: the selection is empty")
    bad = (selection < 0) | (selection >= n_users)
    if bad.any():
        raise UserError(f"{path}: row {int(selection[bad][0])} out of range 0..{n_users - 1}")
    values, counts = np.unique(selection, return_counts=True)
    if (counts > 1).any():
        raise UserError(
            f"{path}: row {int(values[counts > 1][0])} selected "
            f"{int(counts[counts > 1][0])} times (duplicates are not allowed)"
        )
    return selection.astype(np.int64)


def fixed_valid_users(ds: Any, n: int, seed: int) -> np.ndarray:
    """``finetune.valid_users: fixed``: ``n`` user rows drawn without replacement, seeded by
    ``seed`` alone, among the users with a valid item; sorted. The same for every selection and
    every run seed, so two selections are early-stopped on the same users.

    Departs from the paper's few-shot code, whose valid set is the selected users' own valid
    items (``code/finetune/data/gen_fewshot.py``, the default ``selected``).

    Raises :class:`UserError` when ``n`` is not in ``1..`` the number of such users."""
    eligible = np.flatnonzero([len(v) > 0 for v in ds.valid])
    if not 1 <= n <= len(eligible):
        raise UserError(
            f"valid_fixed_n={n}: expected 1..{len(eligible)} (the users with a valid item)"
        )
    return np.sort(np.random.default_rng(seed).choice(eligible, n, replace=False))


def valid_rows(ds: Any, selection: np.ndarray, cfg: FinetuneConfig) -> np.ndarray:
    """The user rows whose valid samples early-stop the fine-tune: the selection
    (``valid_users: selected``; users without a valid item give no sample) or
    :func:`fixed_valid_users` (``fixed``)."""
    if cfg.valid_users == "selected":
        return selection
    if cfg.valid_users == "fixed":
        return fixed_valid_users(ds, cfg.valid_fixed_n, cfg.valid_fixed_seed)
    raise UserError(f"--valid-users {cfg.valid_users!r}: expected selected or fixed")


def added_settings(cfg: FinetuneConfig) -> dict:
    """The options added after checkpoints were made (``option(since=...)``) that are not at
    their default: part of a checkpoint's settings, so a checkpoint made before they existed
    still resumes at their defaults."""
    return {
        f.name: getattr(cfg, f.name)
        for f in fields(cfg)
        if f.metadata.get("since")
        and not at_since_default(fields(cfg), f.name, getattr(cfg, f.name))
    }


def resume_state(resume: bool, ckpt: Path, settings: dict) -> dict | None:
    """The ``state.json`` of the checkpoint folder ``ckpt`` (both backends' fine-tunes) when the
    run continues from it (``resume`` and a committed checkpoint), else ``None``.

    Args:
      resume: ``cfg.resume``; ckpt: ``OUT/checkpoint``; settings: what this run must share
        with the checkpoint's run (dataset, selection, the resume keys, :func:`added_settings`).
    Raises:
      UserError (one line, nothing changed): ``state.json`` unreadable or without an epoch, or
      the checkpoint made with other settings (the keys that differ are named).
    """
    if not (resume and (ckpt / "state.json").is_file()):
        return None
    state = read_json(ckpt / "state.json", RESTART)
    if not isinstance(state.get("epoch"), int):
        raise UserError(f"{ckpt / 'state.json'}: damaged (no epoch); {RESTART}")
    old = state.get("settings", {})
    if old != settings:
        diff = sorted(k for k in {*settings, *old} if old.get(k) != settings.get(k))
        raise UserError(
            f"{ckpt}: checkpoint was made with other settings ({', '.join(diff)}); "
            "use --no-resume to start over or another --out"
        )
    return state


def save_best(model: Any, out: Path) -> None:
    """``model.save_pretrained`` (safetensors) into the folder ``out``, file by file atomically:
    the best epoch's model of both backends (BIGRec: the peft LoRA adapter; TIGER: the T5)."""
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".best-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
