"""Sharded, resumable scoring of every row of ``sequential_train.txt``: the one loop behind
``dealrec effort`` (both backends) and ``dealrec user-reps``.

Rows ``--users A:B`` (default all) are cut at multiples of ``shard_size``
(:func:`shard_ranges`); each shard is scored and written atomically under ``OUT.shards/`` as
``rows-AAAAAAAA-BBBBBBBB.npy`` with a JSON manifest, the shard's commit point, so ``--resume``
continues after a kill with no row lost or scored twice. Under ``accelerate launch`` (or
torchrun) each process takes every ``world``-th shard (:func:`processes`). When every row is
covered, rank 0 merges the shards into ``OUT`` (:func:`merge_shards`: float32, aligned to
``sequential_train.txt``) with its manifest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxrec.data import load_scores, read_manifest, save_scores
from jaxrec.errors import ScoreFileError, UserError

EFFORT_SHARD = "effort-shard"  # the shard kind of `dealrec effort` (both backends)

#: ``score(a, b, bar) -> array``: the values of rows ``a..b-1`` (``[b - a]`` or ``[b - a, D]``),
#: advancing ``bar`` by ``b - a`` in all.
ScoreRows = Callable[[int, int, Any], np.ndarray]


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
    """``OUT.shards/``, the folder of ``OUT``'s shards."""
    return out.with_name(out.name + ".shards")


def shard_path(folder: Path, a: int, b: int) -> Path:
    """The file of the shard of rows ``a..b-1``."""
    return folder / f"rows-{a:08d}-{b:08d}.npy"


def length_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int = 0
) -> list[np.ndarray]:
    """Length bucketing: indices sorted by length, cut into batches of at most ``batch_size``
    samples and (when ``max_tokens > 0``) at most ``max_tokens`` padded tokens (a longer sample
    goes alone)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    cur: list[int] = []
    for i in order:
        width = max(lengths[i], max((lengths[j] for j in cur), default=0))
        if cur and (len(cur) == batch_size or (max_tokens and width * (len(cur) + 1) > max_tokens)):
            batches.append(np.asarray(cur))
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(np.asarray(cur))
    return batches


def existing_shards(
    folder: Path, ds: Any, settings: dict | None = None, *, shard_kind: str
) -> dict[tuple[int, int], Path]:
    """Committed shards of ``shard_kind`` in ``folder`` (their manifest exists) as
    ``{(a, b): path}``.

    Raises :class:`UserError` (ScoreFileError) for a shard of another kind or dataset or, when
    ``settings`` is given, made with other settings; nothing is written.
    """
    found: dict[tuple[int, int], Path] = {}
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
    ds: Any,
    *,
    shard_kind: str,
    kind: str,
    options: dict | None = None,
    extra: dict | None = None,
) -> Path | None:
    """Join the shards in ``folder`` into ``out`` (float32, one value, or one row of a
    ``[n, D]`` shard, per line of ``sequential_train.txt``) with its manifest of ``kind``
    (``options`` plus the shards' ``settings``; ``extra`` as top-level keys), when they cover
    every row exactly once.

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
    if scores is None or (covered == 0).any():
        return None
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


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones: ``rank`` of ``world``, ``barrier()``
    waits for all, ``device`` is the launcher's device for this process (``None``: choose)."""

    rank: int
    world: int
    barrier: Callable[[], Any]
    device: Any = None


def processes() -> Processes:
    """The processes of ``accelerate launch`` / torchrun (they set ``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``); one process otherwise.

    accelerate's own state is used where it sees the processes (GPUs); on a CPU-only machine it
    reports one process, so a gloo process group is set up from the launcher's environment.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(0, 1, lambda: None)
    from accelerate import PartialState  # here: only under a multi-process launch

    state = PartialState()
    if state.num_processes > 1:
        return Processes(
            state.process_index, state.num_processes, state.wait_for_everyone, state.device
        )
    import torch.distributed as dist  # here: torch only under a multi-process launch

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), dist.barrier)


@dataclass(frozen=True)
class Plan:
    """The shards of one command run: ``units`` this process owns in ``start..stop-1`` (every
    ``world``-th of all ``n_shards``), ``todo`` those still to score, ``skipped`` rows of
    ``units`` already committed (``--resume``)."""

    start: int
    stop: int
    n_shards: int
    units: list[tuple[int, int]]
    todo: list[tuple[int, int]]
    skipped: int


def plan(
    users: str,
    shard_size: int,
    resume: bool,
    ds: Any,
    folder: Path,
    settings: dict,
    *,
    shard_kind: str,
    procs: Processes | None = None,
) -> Plan:
    """The shards of ``--users`` for this process (split before resuming, so every process
    keeps its shards) and those not yet committed with ``settings`` (all without ``resume``).

    Raises :class:`UserError` for a bad ``--users`` or a shard made otherwise."""
    procs = procs or Processes(0, 1, lambda: None)
    start, stop = parse_users(users, ds.n_users)
    done = existing_shards(folder, ds, settings, shard_kind=shard_kind)
    every = shard_ranges(start, stop, shard_size)
    units = every[procs.rank :: procs.world]
    todo = [u for u in units if not (resume and u in done)]
    skipped = sum(b - a for a, b in units) - sum(b - a for a, b in todo)
    return Plan(start, stop, len(every), units, todo, skipped)


def score_shards(
    todo: list[tuple[int, int]],
    score: ScoreRows,
    *,
    folder: Path,
    ds: Any,
    shard_kind: str,
    settings: dict,
    desc: str,
    unit: str = "sample",
    procs: Processes | None = None,
    **meta: Any,
) -> None:
    """Score each shard ``(a, b)`` of ``todo`` with ``score`` and commit it (atomic write of
    the array, then its manifest: ``rows``, ``settings``, the seconds it took and ``meta``)."""
    procs = procs or Processes(0, 1, lambda: None)
    bar = tqdm(
        total=sum(b - a for a, b in todo),
        desc=f"{desc}[{procs.rank}]" if procs.world > 1 else desc,
        unit=unit,
        position=procs.rank,
        dynamic_ncols=True,
    )
    for a, b in todo:
        t0 = time.perf_counter()
        values = score(a, b, bar)
        save_scores(
            shard_path(folder, a, b),
            values,
            kind=shard_kind,
            dataset=ds.fingerprint(),
            seconds=time.perf_counter() - t0,
            rows=[a, b],
            settings=settings,
            **meta,
        )
    bar.close()


def report_missing(
    label: str, folder: Path, out: Path, ds: Any, *, shard_kind: str, verb: str = "scored"
) -> None:
    """Print how many rows are committed when ``out`` is not written yet."""
    n = sum(b - a for a, b in existing_shards(folder, ds, shard_kind=shard_kind))
    print(
        f"{label}: {n} of {ds.n_users} rows {verb} in "
        f"{folder}; {out} is written when all rows are (run the other --users ranges with the "
        "same --out)"
    )
