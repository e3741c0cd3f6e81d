"""``dealrec experiment``: run the shared stages, then every cell not finished or archived,
and write the tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

from jaxrec.archive import RunArchive
from jaxrec.data import write_json
from jaxrec.experiment.grid import (
    PER_RUN,
    ExperimentArgs,
    baseline_of,
    read_experiment,
    selected_cells,
    shared_reads,
    wire_cell,
)
from jaxrec.experiment.rows import archive_run, cell_row, group_rows
from jaxrec.experiment.stats import summarise
from jaxrec.experiment.tables import markdown, write_csv, write_results
from jaxrec.pipeline import (
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


def main(args: ExperimentArgs) -> int:
    data, exp, cells = read_experiment(args)
    todo = selected_cells(cells, args, exp.sweep)
    pipe = data["pipeline"]
    workdir, dataset, log = prepare_workdir(data, args)
    wired = wire(data, workdir, dataset, pipe.backend)
    llm = {m: uses_llm_reps(pipe, data, m) for m in exp.methods}
    reads = {m: shared_reads(pipe, m, llm[m]) for m in exp.methods}
    shared = pipe.active(sorted({s for c in todo for s in reads[c.method]}))
    shared += add_score_stages(wired, sorted({c.method for c in todo}))
    log.say(
        f"dealrec experiment {args.config} ({pipe.backend}): {len(cells)} runs "
        f"({len(exp.methods)} methods x {len(exp.seeds)} seeds x "
        f"{len(cells) // (len(exp.methods) * len(exp.seeds))} grid points), "
        f"{len(todo)} of them now, in {workdir}"
    )
    # a run depends on the shared stages it reads (run now or earlier)
    upstream = {
        m: digest([key_options(s, wired[s]) for s in reads[m]] + baseline_score_options(wired, m))
        for m in exp.methods
    }
    archive = RunArchive(exp.archive) if exp.archive else None
    # each cell's folder, wired sections, reuse key and whether its folder holds it finished
    prepared = {}
    for cell in cells:
        d, w = wire_cell(wired, workdir, cell, llm[cell.method])
        key = stage_keys(list(PER_RUN), w, upstream[cell.method])["evaluate"]
        done = stages_finished(list(PER_RUN), w, d / "stages.json", upstream[cell.method])
        prepared[cell] = (d, w, key, done)
    shared_seconds = (
        run_stages(shared, wired, workdir, log)
        if archive is None or any(not (prepared[c][3] or prepared[c][2] in archive) for c in todo)
        else recorded_seconds(shared, workdir, log)
    )
    rows = []
    for cell in cells:
        d, w, key, finished = prepared[cell]
        if not finished and archive is not None and key in archive:
            if cell in todo:
                log.say(f"run {cell.name}: archived in {archive.folder}, not rerun")
            rows.append(
                archive.row(key, {**dict(cell.point), "method": cell.method, "seed": cell.seed})
            )
            continue
        if cell in todo:
            d.mkdir(parents=True, exist_ok=True)
            log.say(f"run {cell.name}" + (f" (in {d.name})" if d.name != cell.name else ""))
            seconds = run_stages(
                list(PER_RUN),
                w,
                d,
                log,
                state_file=d / "stages.json",
                upstream=upstream[cell.method],
            )
        elif finished:
            state = json.loads((d / "stages.json").read_text())
            seconds = {s: state[s].get("seconds", 0.0) for s in PER_RUN}
        else:
            continue
        rows.append(cell_row(cell, d, seconds, key, stage_output("finetune", w["finetune"])))
        if archive is not None:
            archive_run(archive, rows[-1])
    keys = list(exp.sweep)
    results = workdir / "studies" / exp.name if exp.name else workdir
    results.mkdir(parents=True, exist_ok=True)
    write_results(results, rows, exp.methods, keys, shared_seconds, baseline_of(exp))
    if exp.user_groups > 0:
        groups = group_rows(
            rows, keys, exp.reference, exp.user_groups, exp.reference_seed, exp.seeds
        )
        table, tests = summarise(groups, exp.methods, [*keys, "group"], baseline_of(exp))
        write_csv(results / "groups.csv", table)
        (results / "groups.md").write_text(
            f"Users split into {exp.user_groups} equal groups by their test loss under the "
            f"{exp.reference!r} run of the {exp.reference_seed} seed (group 1: lowest loss)\n\n"
            + markdown(table, tests, [], {}, [*keys, "group"], baseline_of(exp))
        )
    write_json(
        results / "experiment.json",
        {
            "config": str(args.config),
            "backend": pipe.backend,
            "methods": exp.methods,
            "seeds": exp.seeds,
            "sweep": exp.sweep,
            "runs_finished": len(rows),
            "runs_total": len(cells),
            "finished": time.time(),
        },
    )
    if len(rows) < len(cells):
        log.say(
            f"{len(rows)} of {len(cells)} runs finished; run the command again (without "
            "--methods/--seeds) to finish the rest"
        )
    print((results / "results.md").read_text())
    return 0


def recorded_seconds(shared: list[str], workdir: Path, log) -> dict:
    """The shared stages' seconds as ``workdir/stages.json`` recorded them (those it has),
    when every run asked for is archived or finished, so no shared stage needs to run (a fresh
    clone rebuilds an archived experiment's tables without recomputing the surrogate)."""
    log.say("every run asked for is archived or finished: the shared stages are not needed")
    state_file = workdir / "stages.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return {s: state[s].get("seconds", 0.0) for s in shared if s in state}
