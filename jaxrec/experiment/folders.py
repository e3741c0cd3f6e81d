"""Run folders: where each cell's per-run stages write (``workdir/runs/NAME``), its wired
options, and which run a folder holds, so that a run never reuses or overwrites the folder of
another run (two studies of one workdir that differ in an option not in the folder's name,
e.g. ``finetune.valid_users``, map ``random`` seed 2 to the same ``runs/random-seed2``).

A run takes its usual folder (:func:`run_folder`) when the folder is new or holds this same run;
otherwise its *spare* folder ``NAME~KEY8`` (:func:`spare_folder`: the first 8 hex digits of its
reuse key), which is looked for first, so a resumed run finds it again. A run records its reuse
key in its folder's ``stages.json`` (entry ``run``) before its first stage, and in its lock
file while it runs (:mod:`jaxrec.experiment.locks`); a folder from before that record is known
by the stage keys its ``stages.json`` holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from jaxrec.data import write_json
import jaxrec.experiment.locks as locks
from jaxrec.experiment.grid import Cell
from jaxrec.pipeline import resolved_options, wire_llm_reps
from jaxrec.stages import PER_RUN

STATE = "stages.json"
LOCK = "run.lock"


def run_folder(cell: Cell, wired: dict) -> str:
    """The name of ``cell``'s run folder: :attr:`Cell.name` without the swept keys whose value is
    the config's own (``wired``), so a grid point equal to the base config is the same run as
    the un-swept cell and runs once (``lamda=0.3`` of the lamda sweep is Table 2's DEALRec run
    when the config's lamda is 0.3).

    Args:
      cell: the run.
      wired: the per-run stages' resolved options before the cell's point is applied.
    Returns:
      the folder name under ``workdir/runs``.
    """

    def base(key: str) -> object:
        section, _, name = key.partition(".")
        return resolved_options(section, wired[section])[name]

    point = tuple((k, v) for k, v in cell.point if base(k) != v)
    return Cell(cell.method, cell.seed, point).name


class WiredCell(NamedTuple):
    """A cell's run folder and its per-run stages' resolved options."""

    folder: Path
    wired: dict


def wire_cell(wired: dict, workdir: Path, cell: Cell, llm_reps: bool = False) -> WiredCell:
    """The usual run folder of ``cell`` (:func:`run_folder`) and its per-run stages' resolved
    options (``llm_reps``: its selection reads the ``user_reps`` stage's file, see
    :func:`jaxrec.pipeline.uses_llm_reps`); :func:`place_run` may move it to its spare folder."""
    w = {k: dict(v) for k, v in wired.items()}
    for key, value in cell.point:
        section, _, name = key.partition(".")
        w[section][name] = value
    w["select"].update(method=cell.method, seed=cell.seed)
    wire_llm_reps(w["select"], w, llm_reps)
    w["finetune"].update(seed=cell.seed)
    d = workdir / "runs" / run_folder(cell, wired)
    return WiredCell(d, in_folder(w, d))


def in_folder(wired: dict, folder: Path) -> dict:
    """``wired`` with the per-run stages' files (selection, adapter, metrics) in ``folder``
    (reuse keys hold only their names, so a run's keys are the same in any folder)."""
    w = {k: dict(v) for k, v in wired.items()}
    w["select"]["out"] = str(folder / "selected.npy")
    w["finetune"].update(selection=str(folder / "selected.npy"), out=str(folder / "adapter"))
    w["evaluate"].update(adapter=str(folder / "adapter"), out=str(folder / "metrics.json"))
    return w


def spare_folder(folder: Path, key: str) -> Path:
    """The run's spare folder beside its usual ``folder``: ``NAME~`` and the first 8 hex digits
    of its reuse ``key`` (the same whichever of the two ``folder`` is)."""
    suffix = f"~{key[:8]}"
    return folder.with_name(folder.name.removesuffix(suffix) + suffix)


def holds_other_run(folder: Path, keys: dict[str, str]) -> bool:
    """Whether ``folder`` holds (finished or begun) stages of a run other than the one whose
    per-run stage keys are ``keys`` (:func:`jaxrec.pipeline.stage_keys`): a live lock of another
    run, a ``stages.json`` recording another run key, or (a folder from before run keys were
    recorded) a per-run stage recorded under another key."""
    key = keys[PER_RUN[-1]]
    found = locks.holder(folder / LOCK) or {}
    if found.get("run", key) != key and not locks.is_stale(found):
        return True
    state_file = folder / STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if "run" in state:
        return state["run"].get("key") != key
    return any(s in state and state[s].get("key") != k for s, k in keys.items())


def place_run(folder: Path, keys: dict[str, str]) -> Path:
    """The folder a run uses: its spare folder when that exists (it ran there before), else
    its usual ``folder`` unless that holds another run (:func:`holds_other_run`)."""
    spare = spare_folder(folder, keys[PER_RUN[-1]])
    if spare.exists() or holds_other_run(folder, keys):
        return spare
    return folder


def claim_folder(folder: Path, key: str) -> None:
    """Record in ``folder``'s ``stages.json`` that it holds the run with reuse key ``key``
    (before its first stage runs; the stage entries already there are kept)."""
    state_file = folder / STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("run", {}).get("key") != key:
        write_json(state_file, {"run": {"key": key}, **state})
