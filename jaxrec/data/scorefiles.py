"""Score files: how scores and selections pass between the JAX and the PyTorch side.

``NAME.npy`` holds float32 scores or int64 indices, aligned to ``sequential_train.txt`` (or a
list of selected rows), written with ``np.save`` and read without pickle. Beside it
``NAME.json``, the manifest::

    {"kind": "influence", "dataset": {"train_sha256": "...", "n_users": 49156},
     "created": "2026-11-22T10:00:00Z", "options": {...}, "seconds": 41.2, "version": "0.1.0",
     "environment": {"python": "3.11.7", "libraries": {"numpy": "2.4.6", "jax": ...}, ...}}

Every reader checks ``kind``, ``n_users`` and ``train_sha256`` before it trusts a file. Writes
go to a temporary name in the same folder and are renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO
from collections.abc import Callable

from numpy.typing import ArrayLike

import numpy as np

from jaxrec import __version__
from jaxrec.errors import ScoreFileError


# the numeric libraries whose versions a manifest records when the writing process loaded them
RECORDED_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")


def environment() -> dict:
    """Where a file was made: Python, NumPy and whichever of :data:`RECORDED_LIBRARIES` this
    process has imported (none is imported here), the machine's architecture, CPU model and
    core count. Every manifest records it, because the same options on another CPU or library
    version can give other floating-point results (docs/studies.md, 2026-12-02).

    Returns:
      ``{"python", "libraries": {name: version}, "machine", "cpu", "cpus"}``.
    """
    libraries = {"numpy": np.__version__}
    for name in RECORDED_LIBRARIES:
        if name in sys.modules:
            try:
                libraries[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "libraries": libraries,
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
    }


def manifest_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def default_mode(directory: bool = False) -> int:
    """The permissions ``open()`` / ``mkdir()`` would give a new file (folder) under the
    process umask; a temporary file or folder (``tempfile``: 0600 / 0700) gets them before
    it is renamed into place, so outputs are as readable as any other file."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``
    (with the permissions of a file made by ``open``: :func:`default_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _json_default(x: object) -> object:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save_scores(
    path: str | Path,
    array: ArrayLike,
    *,
    kind: str,
    dataset: dict,
    options: dict | None = None,
    seconds: float | None = None,
    **extra: Any,
) -> Path:
    """Save ``array`` to ``path`` (``.npy``) and its manifest to ``path`` with ``.json``.

    Scores are stored as float32, selections (integer arrays) as int64. ``dataset`` is the
    dataset fingerprint (:meth:`jaxrec.data.Dataset.fingerprint`).
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ScoreFileError(f"{path}: a score file name must end in .npy")
    array = np.asarray(array)
    array = array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)
    manifest = {
        "kind": kind,
        "dataset": {"train_sha256": dataset["train_sha256"], "n_users": int(dataset["n_users"])},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": options or {},
        "seconds": None if seconds is None else round(float(seconds), 3),
        "version": __version__,
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "environment": environment(),
        **extra,
    }
    atomic_write_bytes(path, lambda f: np.save(f, array, allow_pickle=False))
    write_json(manifest_path(path), manifest)
    return path


def read_manifest(path: str | Path) -> dict:
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise ScoreFileError(f"{mpath}: manifest not found (every score file needs one)")
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ScoreFileError(f"{mpath}: not valid JSON ({e})") from None


def load_scores(
    path: str | Path, *, kind: str | tuple[str, ...] | None = None, dataset: dict | None = None
) -> tuple[np.ndarray, dict]:
    """Load a score file and its manifest, checking kind and dataset fingerprint.

    Args:
      path: the ``.npy`` file.
      kind: expected manifest kind (or tuple of accepted kinds); ``None`` accepts any.
      dataset: expected fingerprint ``{"train_sha256", "n_users"}``; ``None`` skips the check.
    Returns:
      ``(array, manifest)``.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreFileError(f"{path}: score file not found")
    manifest = read_manifest(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and manifest.get("kind") not in kinds:
        raise ScoreFileError(
            f"{path}: kind is {manifest.get('kind')!r}, expected {' or '.join(map(repr, kinds))}"
        )
    if dataset is not None:
        got = manifest.get("dataset", {})
        if got.get("train_sha256") != dataset["train_sha256"]:
            raise ScoreFileError(f"{path}: made from another dataset (train_sha256 mismatch)")
        if int(got.get("n_users", -1)) != int(dataset["n_users"]):
            raise ScoreFileError(
                f"{path}: made for {got.get('n_users')} users, dataset has {dataset['n_users']}"
            )
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ScoreFileError(f"{path}: not a readable .npy file ({e})") from None
    if (
        manifest.get("kind") in _PER_USER_KINDS
        and dataset is not None
        and array.shape != (int(dataset["n_users"]),)
    ):
        raise ScoreFileError(f"{path}: shape {array.shape}, expected ({dataset['n_users']},)")
    return array, manifest


# Kinds whose array has one entry per user (the others, e.g. "selection", are index lists).
_PER_USER_KINDS = {"influence", "effort", "grand", "el2n", "score"}


# ----------------------------------------------------------------------------- parts
# One process's rows of a score file, under ``NAME.shards/`` (the layout of ``dealrec
# effort``'s shards: ``rows-AAAAAAAA-BBBBBBBB.npy`` + manifest, the manifest being the part's
# commit point). The merged ``NAME.npy`` + ``NAME.json`` is written once every part is there.


def part_folder(path: str | Path) -> Path:
    """``NAME.shards/`` beside the score file ``NAME.npy``."""
    path = Path(path)
    return path.with_name(path.name + ".shards")


def part_path(path: str | Path, a: int, b: int) -> Path:
    """The part of ``path`` holding rows ``a..b-1``."""
    return part_folder(path) / f"rows-{a:08d}-{b:08d}.npy"


def save_part(
    path: str | Path, array: ArrayLike, rows: tuple[int, int], *, kind: str, dataset: dict
) -> Path:
    """Write rows ``rows = (a, b)`` of the score file ``path`` as a part (kind
    ``KIND-part``), manifest last."""
    a, b = rows
    return save_scores(
        part_path(path, a, b), array, kind=f"{kind}-part", dataset=dataset, rows=[a, b]
    )


def merge_parts(path: str | Path, *, kind: str, dataset: dict, **manifest: Any) -> Path:
    """Join the committed parts of ``path`` (:func:`save_part`) into ``path`` + its manifest
    (``manifest`` as for :func:`save_scores`, plus ``parts``: how many), then remove them.

    Raises :class:`ScoreFileError` unless the parts cover rows ``0..n_users-1`` exactly once.
    """
    folder = part_folder(path)
    n = int(dataset["n_users"])
    pieces, end = [], 0
    for part in sorted(folder.glob("rows-*-*.npy")):
        if not manifest_path(part).is_file():
            continue  # not committed
        array, meta = load_scores(part, kind=f"{kind}-part", dataset=dataset)
        a, b = meta["rows"]
        if a != end or array.shape[0] != b - a:
            raise ScoreFileError(f"{folder}: parts do not cover rows {end}.. exactly once")
        pieces.append(array)
        end = b
    if end != n:
        raise ScoreFileError(f"{folder}: parts cover rows 0..{end - 1} of {n}")
    out = save_scores(
        path, np.concatenate(pieces), kind=kind, dataset=dataset, parts=len(pieces), **manifest
    )
    for part in folder.glob("rows-*-*"):
        part.unlink()
    folder.rmdir()
    return out
