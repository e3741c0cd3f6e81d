"""``dealrec experiment``: run the shared stages, then every cell not finished or archived,
and write the tables."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

from jaxrec.archive import RunArchive
from jaxrec.data import write_json
import jaxrec.experiment.locks as locks
from jaxrec.experiment.grid import (
    Cell,
    ExperimentArgs,
    ExperimentConfig,
    baseline_of,
    read_experiment,
    selected_cells,
    shared_reads,
)
from jaxrec.experiment.folders import (
    LOCK,
    STATE,
    claim_folder,
    holds_other_run,
    in_folder,
    place_run,
    spare_folder,
    wire_cell,
)
from jaxrec.experiment.rows import archive_run, cell_row, group_rows
from jaxrec.experiment.stats import summarise
from jaxrec.experiment.tables import markdown, write_csv, write_results
from jaxrec.pipeline import (
    RunLog,
    add_score_stages,
    baseline_score_options,
    digest,
    key_options,
    prepare_workdir,
    run_stages,
    stage_keys,
    stage_output,
    stages_finished,
    uses_llm_reps,
    wire,
)
from jaxrec.stages import PER_RUN


DEFAULT_RUN_SECONDS = 600.0  # a run's rough time with no timed run to go by (TIGER: 6-18 min)


class Prepared(NamedTuple):
    """A cell's run folder, wired sections, reuse key and whether its folder holds it
    finished."""

    folder: Path
    wired: dict
    key: str
    finished: bool


def main(args: ExperimentArgs) -> int:
    """``dealrec experiment``: plan, run the shared stages (under a lock), run the cells not
    finished, archived or taken by another process, and write the tables.

    Args:
      args: the command line.
    Returns:
      the exit status (0).
    """
    data, exp, cells = read_experiment(args)
    todo = selected_cells(cells, args, exp.sweep)
    pipe = data["pipeline"]
    workdir, dataset, log = prepare_workdir(data, args)
    wired = wire(data, workdir, dataset, pipe.backend)
    llm = {m: uses_llm_reps(pipe, data, m) for m in exp.methods}
    reads = {m: shared_reads(pipe, m, llm[m]) for m in exp.methods}
    shared = pipe.active(sorted({s for c in todo for s in reads[c.method]}))
    shared += add_score_stages(wired, sorted({c.method for c in todo}))
    log.say(describe(args, exp, cells, todo, pipe.backend, workdir))
    # a run depends on the shared stages it reads (run now or earlier)
    upstream = {
        m: digest([key_options(s, wired[s]) for s in reads[m]] + baseline_score_options(wired, m))
        for m in exp.methods
    }
    archive = RunArchive(exp.archive) if exp.archive else None
    prepared = {c: prepare(c, wired, workdir, llm[c.method], upstream[c.method]) for c in cells}
    pending = [c for c in todo if not (prepared[c].finished or _in(archive, prepared[c].key))]
    log.say(plan_text(todo, pending, prepared, archive, shared))
    if moved := moved_text([c for c in todo if c in pending or prepared[c].finished], prepared):
        log.say(moved)
    if args.plan:
        return 0
    if archive is None or pending:
        with locks.held(workdir / "shared.lock", log.say):
            shared_seconds = run_stages(shared, wired, workdir, log)
    else:
        shared_seconds = recorded_seconds(shared, workdir, log)
    rows = [
        row
        for cell in cells
        if (row := run_cell(cell, prepared[cell], cell in todo, archive, upstream, log))
    ]
    results = workdir / "studies" / exp.name if exp.name else workdir
    write_all(results, rows, exp, args, pipe.backend, shared_seconds, len(cells))
    if len(rows) < len(cells):
        log.say(
            f"{len(rows)} of {len(cells)} runs finished; run the command again (without "
            "--methods/--seeds) to finish the rest"
        )
    print((results / "results.md").read_text())
    return 0


def prepare(cell: Cell, wired: dict, workdir: Path, llm_reps: bool, upstream: str) -> Prepared:
    """``cell``'s run folder (:func:`~jaxrec.experiment.folders.place_run`: its usual one
    unless that holds another run), wired sections, reuse key and whether it is finished there
    (``upstream``: the key of the shared stages it reads)."""
    usual, w = wire_cell(wired, workdir, cell, llm_reps)
    keys = stage_keys(list(PER_RUN), w, upstream)
    d = place_run(usual, keys)
    w = in_folder(w, d)
    return Prepared(d, w, keys[PER_RUN[-1]], stages_finished(list(PER_RUN), w, d / STATE, upstream))


def moved_text(cells: list[Cell], prepared: dict[Cell, Prepared]) -> str:
    """Those of ``cells`` whose usual folder holds another run (another study's in this
    workdir), each with the folder it uses instead; empty when there is none."""
    moved = [
        c for c in cells if prepared[c].folder == spare_folder(prepared[c].folder, prepared[c].key)
    ]
    return (
        "runs in their spare folder (their usual one holds another run): "
        + ", ".join(f"{c.name} in runs/{prepared[c].folder.name}" for c in moved)
        if moved
        else ""
    )


def _in(archive: RunArchive | None, key: str) -> bool:
    return archive is not None and key in archive


def describe(
    args: ExperimentArgs,
    exp: ExperimentConfig,
    cells: list[Cell],
    todo: list[Cell],
    backend: str,
    workdir: Path,
) -> str:
    """The first log line: the experiment's size and what runs now."""
    seeds = {len(exp.seeds_for(m)) for m in exp.methods}
    per_method = (
        f"{seeds.pop()} seeds"
        if len(seeds) == 1
        else "seeds " + ", ".join(f"{m} {len(exp.seeds_for(m))}" for m in exp.methods)
    )
    points = max(1, len(cells) // max(1, sum(len(exp.seeds_for(m)) for m in exp.methods)))
    return (
        f"dealrec experiment {args.config} ({backend}): {len(cells)} runs "
        f"({len(exp.methods)} methods x {per_method} x {points} grid points), "
        f"{len(todo)} of them now, in {workdir}"
    )


def run_seconds(rows: list[dict]) -> dict[str, list[float]]:
    """Select + finetune + evaluate seconds of the timed ``rows`` (archived or finished runs),
    per method, and under ``""`` all of them."""
    total: dict[str, list[float]] = {}
    for r in rows:
        try:
            sec = sum(float(r.get(f"{s}_seconds") or 0.0) for s in PER_RUN)
        except ValueError:
            continue
        if sec > 0:
            total.setdefault(r["method"], []).append(sec)
            total.setdefault("", []).append(sec)
    return total


def plan_text(
    todo: list[Cell],
    pending: list[Cell],
    prepared: dict[Cell, Prepared],
    archive: RunArchive | None,
    shared: list[str],
) -> str:
    """What the command will do, said before any long stage starts: how many of the runs asked
    for are archived or finished, how many it will run and a rough time: each run at the mean
    seconds of the timed runs of its method (archived, or finished in the workdir), else of
    any timed run, else :data:`DEFAULT_RUN_SECONDS`; the shared stages are not counted."""
    archived = sum(1 for c in todo if not prepared[c].finished and _in(archive, prepared[c].key))
    finished = sum(1 for c in todo if prepared[c].finished)
    text = (
        f"{len(todo)} runs asked for: {archived} archived, {finished} finished in the workdir, "
        f"{len(pending)} to run"
    )
    if not pending:
        return text + " (nothing to compute)"
    timed = list(archive.rows.values()) if archive is not None else []
    timed += [_finished_seconds(c.method, p.folder) for c, p in prepared.items() if p.finished]
    known = {m: sum(v) / len(v) for m, v in run_seconds(timed).items()}
    seconds = sum(known.get(c.method, known.get("", DEFAULT_RUN_SECONDS)) for c in pending)
    source = (
        f"the mean seconds of {len(run_seconds(timed)[''])} timed runs"
        if known
        else f"{DEFAULT_RUN_SECONDS / 60:.0f} min a run, no timed run to go by"
    )
    text += f", about {_duration(seconds)} in one process ({source})"
    if shared:
        text += f", after the shared stages ({', '.join(shared)}; reused where finished)"
    return text


def _finished_seconds(method: str, folder: Path) -> dict:
    """A finished run's seconds per stage from its ``stages.json``, as a row."""
    state = json.loads((folder / "stages.json").read_text())
    return {"method": method, **{f"{s}_seconds": state[s].get("seconds", 0.0) for s in PER_RUN}}


def _duration(seconds: float) -> str:
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{max(minutes, 1)} min"


def _run_seconds(state_file: Path) -> dict[str, float]:
    """The per-run stages' seconds recorded in a finished run's ``stages.json``."""
    state = json.loads(state_file.read_text())
    return {s: state[s].get("seconds", 0.0) for s in PER_RUN}


def run_cell(
    cell: Cell,
    prep: Prepared,
    now: bool,
    archive: RunArchive | None,
    upstream: dict[str, str],
    log: RunLog,
) -> dict | None:
    """The results row of ``cell``: from the archive, from its finished folder, or by running
    it now (``now``: it is one of the cells asked for) under its run lock; ``None`` when it
    is not finished and not run now (not asked for, or taken by another process)."""
    d, w, key, finished = prep
    fields = {**dict(cell.point), "method": cell.method, "seed": cell.seed}
    if not finished and archive is not None and key in archive:
        if now:
            log.say(f"run {cell.name}: archived in {archive.folder}, not rerun")
        return archive.row(key, fields)
    if finished:
        seconds = _run_seconds(d / STATE)
    elif now and (taken := take_run(cell, prep, upstream[cell.method], log)):
        d, w, seconds = taken
    else:
        return None
    row = cell_row(cell, d, seconds, key, stage_output("finetune", w["finetune"]))
    if archive is not None:
        archive_run(archive, row)
    return row


def take_run(
    cell: Cell, prep: Prepared, upstream: str, log: RunLog
) -> tuple[Path, dict, dict] | None:
    """Run ``cell`` now under its run lock, in its folder or, when another run (another
    study's process) took that folder since the plan, in its spare folder; ``(folder, wired,
    seconds)``, or ``None`` when another process runs it."""
    keys = stage_keys(list(PER_RUN), prep.wired, upstream)
    for d in dict.fromkeys([prep.folder, spare_folder(prep.folder, prep.key)]):
        d.mkdir(parents=True, exist_ok=True)
        w = in_folder(prep.wired, d)
        if not locks.acquire(d / LOCK, {"run": prep.key}):
            found = locks.holder(d / LOCK) or {}
            if found.get("run", prep.key) != prep.key:
                continue  # another run's process took the folder
            log.say(
                f"run {cell.name}: taken by {found.get('host')} pid {found.get('pid')}, left to it"
            )
            return None
        try:
            if not holds_other_run(d, keys):
                return d, w, _run_in(cell, d, w, prep.key, upstream, log)
        finally:
            locks.release(d / LOCK)
    log.say(f"run {cell.name}: its folders hold other runs, not run")
    return None


def _run_in(cell: Cell, d: Path, w: dict, key: str, upstream: str, log: RunLog) -> dict:
    """Run (or, when another process finished it since the plan, read) the per-run stages of
    ``cell`` in folder ``d``, which this process holds locked; ``{stage: seconds}``."""
    state_file = d / STATE
    if stages_finished(list(PER_RUN), w, state_file, upstream):
        return _run_seconds(state_file)  # finished between our plan and our lock: not run twice
    claim_folder(d, key)
    log.say(f"run {cell.name}" + (f" (in {d.name})" if d.name != cell.name else ""))
    return run_stages(list(PER_RUN), w, d, log, state_file=state_file, upstream=upstream)


def write_all(
    results: Path,
    rows: list[dict],
    exp: ExperimentConfig,
    args: ExperimentArgs,
    backend: str,
    shared_seconds: dict,
    n_cells: int,
) -> None:
    """The tables, the user groups' tables and ``experiment.json`` into ``results``."""
    keys = list(exp.sweep)
    results.mkdir(parents=True, exist_ok=True)
    baseline = baseline_of(exp)
    write_results(results, rows, exp.methods, keys, shared_seconds, baseline, exp.bootstrap)
    if exp.user_groups > 0:
        groups = group_rows(
            rows,
            keys,
            exp.reference,
            exp.user_groups,
            exp.reference_seed,
            exp.seeds_for(exp.reference),
        )
        table, tests = summarise(groups, exp.methods, [*keys, "group"], baseline)
        write_csv(results / "groups.csv", table)
        (results / "groups.md").write_text(
            f"Users split into {exp.user_groups} equal groups by their test loss under the "
            f"{exp.reference!r} run of the {exp.reference_seed} seed (group 1: lowest loss)\n\n"
            + markdown(table, tests, [], {}, [*keys, "group"], baseline)
        )
    write_json(
        results / "experiment.json",
        {
            "config": str(args.config),
            "backend": backend,
            "methods": exp.methods,
            "seeds": exp.seeds,
            "seeds_of": exp.seeds_of,
            "sweep": exp.sweep,
            "runs_finished": len(rows),
            "runs_total": n_cells,
            "finished": time.time(),
        },
    )


def recorded_seconds(shared: list[str], workdir: Path, log: RunLog) -> dict:
    """The shared stages' seconds as ``workdir/stages.json`` recorded them (those it has),
    when every run asked for is archived or finished, so no shared stage needs to run (a fresh
    clone rebuilds an archived experiment's tables without recomputing the surrogate)."""
    log.say("every run asked for is archived or finished: the shared stages are not needed")
    state_file = workdir / "stages.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return {s: state[s].get("seconds", 0.0) for s in shared if s in state}
