"""``dealrec run CONFIG``: the whole DEALRec pipeline from one config file.

Stages, each a ``dealrec`` subcommand run in its own process (so JAX and PyTorch never share
one, and each frees its accelerator memory when done)::

    surrogate -> influence -> [semantic_ids] -> effort -> [user_reps] -> select -> finetune
    -> evaluate

``pipeline.backend`` picks the recommender that is fine-tuned: ``bigrec`` (an LLM with LoRA on
item titles) or ``tiger`` (a small T5 on semantic-ID codes; it adds the ``semantic_ids`` stage,
and the pipeline passes the backend and the codes to effort, finetune and evaluate).
``user_reps`` (``dealrec user-reps``: the backend's embedding of every user's history, BIGRec's
LLM over the prompt or TIGER's T5 encoder over the semantic IDs; ``user_reps.backend: bigrec``
keeps the text LLM under TIGER) runs when the selection method is ``tfdcon``, which then
clusters on both the surrogate's and the LLM's user representations (TF-DCon's two halves);
``pipeline.tfdcon_llm_reps: false`` (or an explicit ``select.llm_reps`` file) skips it.

The config file has a ``pipeline:`` section (:class:`PipelineConfig`) and one section per
stage (``surrogate:``, ``influence:``, ``semantic_ids:``, ``effort:``, ``select:``,
``finetune:``, ``evaluate:``), with the same keys as the subcommands' flags. The pipeline wires
the paths
(every output goes under ``workdir``) and writes the resolved config to
``workdir/resolved.yaml``. A stage whose output exists and whose resolved options (and those of
every stage before it) are unchanged is reused, so a re-run after an interruption continues
where it stopped; stages that can resume themselves (training, effort, fine-tune) do so.
Everything the stages print also goes to ``workdir/run.log``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, cast

import yaml

from jaxrec.config_io import (
    flat_options,
    help_of,
    keyed_value,
    load_config_file,
    make_config,
    option,
)
from jaxrec.data import load_dataset
from jaxrec.data.subset import write_user_subset
from jaxrec.errors import UserError
from jaxrec.runlog import RunLog
from jaxrec.select import REQUIRES, score_stages
from jaxrec.stages import (
    BACKEND_STAGES,
    SHARED_INPUTS,
    STAGE,
    STAGES,
    base_stage,
    config_classes,
    stage_inputs,
)

# ``influence:`` keys that only the GraNd / EL2N score stages read (the early-training variant);
# they are left out of the influence stage's reuse key, so setting them reruns only those
BASELINE_SCORE_KEYS = ("score_model", "early_epochs", "early_inits")


@dataclass
class PipelineConfig:
    """The ``pipeline:`` section of a config file."""

    workdir: str = option("runs/demo", "folder of every stage's output, run.log and resolved.yaml")
    data: str = option("../shared/data/games", "dataset folder")
    backend: Literal["bigrec", "tiger"] = option(
        "bigrec", "bigrec: LLM + LoRA on titles; tiger: T5 on semantic IDs (adds semantic_ids)"
    )
    users: int = option(
        0, "> 0: run on a seeded slice of this many users (in WORKDIR/data); 0 = every user"
    )
    slice_seed: int = option(0, "seed of the user slice (users > 0)")
    slice_items: bool = option(False, "with users > 0: keep only the slice's items (renumbered)")
    stages: list[str] = option(
        list(STAGES), "the stages to run, in pipeline order (semantic_ids: tiger only)"
    )
    tfdcon_llm_reps: bool = option(
        True,
        "tfdcon clusters on the surrogate's and the LLM's user representations "
        "(the user_reps stage makes the latter); false = the surrogate's only",
    )

    def active(self, requested: list[str] | None = None) -> list[str]:
        """The stages to run, in pipeline order: ``requested`` (or ``stages``), without
        ``semantic_ids`` when the backend does not use it."""
        wanted = set(requested or self.stages)
        return [s for s in STAGES if s in wanted and self.backend in STAGE[s].backends]


@dataclass
class PipelineArgs:
    """Command line of ``dealrec run`` / ``dealrec experiment``: a config file, plus
    overrides."""

    config: str = field(metadata={"help": "YAML config file (see configs/)"})
    workdir: str = option("", "override pipeline.workdir")
    stages: list[str] = option([], "run only these stages (their inputs must exist)")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("config", help=help_of(PipelineArgs, "config"))
        parser.add_argument("--workdir", default="", help=help_of(PipelineArgs, "workdir"))
        parser.add_argument(
            "--stages",
            nargs="+",
            default=[],
            choices=STAGES,
            help=help_of(PipelineArgs, "stages"),
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PipelineArgs:
        return cls(config=args.config, workdir=args.workdir, stages=list(args.stages))


# ----------------------------------------------------------------------------- config
def read_experiment_file(path: str | Path, extra_sections: tuple[str, ...] = ()) -> dict:
    """Read a config file and check every section and key (unknown ones are errors)."""
    data = load_config_file(path)
    known = {"pipeline", *STAGES, *extra_sections}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(
            f"{path}: unknown section {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    classes = config_classes()
    for stage in STAGES:
        make_config(classes[stage], data.get(stage) or {}, f"{path} [{stage}]")
    data["pipeline"] = make_config(PipelineConfig, data.get("pipeline") or {}, f"{path} [pipeline]")
    bad = sorted(set(data["pipeline"].stages) - set(STAGES))
    if bad:
        raise UserError(f"{path} [pipeline]: unknown stage {bad[0]!r}")
    # every stage as it will run (the backend and paths filled in: TIGER's beams >= 20, say),
    # checked before any stage starts; wire() writes nothing
    pipe = data["pipeline"]
    wired = wire(data, Path(pipe.workdir), pipe.data, pipe.backend)
    for stage in STAGES:
        make_config(classes[stage], wired[stage], f"{path} [{stage}]")
    return data


def check_tiger_history(sections: dict) -> None:
    """TIGER's effort must score the sample the fine-tune trains on: the same ``max_history``
    in the ``effort`` and ``finetune`` sections (defaults included)."""
    classes = config_classes()
    values = {
        stage: (sections.get(stage) or {}).get("max_history", classes[stage].max_history)
        for stage in ("effort", "finetune")
    }
    if values["effort"] != values["finetune"]:
        raise UserError(
            f"effort.max_history ({values['effort']}) must equal finetune.max_history "
            f"({values['finetune']}) with the tiger backend: effort scores the fine-tune's sample"
        )


def wire(sections: dict, workdir: Path, data: str, backend: str = "bigrec") -> dict:
    """Fill in every stage's input and output paths under ``workdir``, and the backend."""
    if backend == "tiger":
        check_tiger_history(sections)
    w = str(workdir)
    out = {stage: f"{w}/{STAGE[stage].output}" for stage in STAGES}  # every stage's output
    wired = {stage: dict(sections.get(stage) or {}) for stage in STAGES}
    wired["surrogate"].update(data=data, out=out["surrogate"])
    wired["influence"].update(run=out["surrogate"], out=out["influence"])
    wired["semantic_ids"].update(data=data, out=out["semantic_ids"])
    for stage in ("semantic_ids", "evaluate"):  # the encoder cache lives in the workdir
        wired[stage].setdefault("cache_dir", f"{w}/cache")
    reps_backend = wired["user_reps"].get("backend", backend)
    if reps_backend not in (backend, "bigrec"):
        raise UserError(
            f"user_reps.backend: {reps_backend} needs pipeline.backend: {reps_backend} "
            "(it reads that backend's inputs)"
        )
    for stage in BACKEND_STAGES:
        wired[stage]["backend"] = backend
        if backend == "tiger":
            wired[stage]["semantic_ids"] = out["semantic_ids"]
    if reps_backend != backend:  # user_reps.backend: bigrec, the text LLM's view under TIGER
        wired["user_reps"]["backend"] = reps_backend
        wired["user_reps"].pop("semantic_ids")
    if reps_backend == "tiger":  # the input of the fine-tune's sample, as effort's
        history = wired["finetune"].get("max_history", config_classes()["finetune"].max_history)
        wired["user_reps"].setdefault("max_history", history)
    wired["effort"].update(data=data, out=out["effort"])
    wired["user_reps"].update(data=data, out=out["user_reps"])
    if backend == "bigrec" and "model" not in wired["user_reps"]:
        wired["user_reps"]["model"] = wired["finetune"].get("model", "")  # the BIGRec LLM
    wired["select"].update(
        data=data,
        influence=out["influence"],
        effort=out["effort"],
        run=out["surrogate"],
        out=out["select"],
    )
    wired["finetune"].update(data=data, selection=out["select"], out=out["finetune"])
    wired["evaluate"].update(data=data, adapter=out["finetune"], out=out["evaluate"])
    return wired


def add_score_stages(wired: dict, methods: Iterable[str]) -> list[str]:
    """Add a stage to ``wired`` for every surrogate score file ``methods`` need (GraNd, EL2N,
    representations; see :func:`jaxrec.select.score_stages`): ``dealrec influence --score KIND
    --out SURROGATE/FILE``, where ``dealrec select`` reads it. Returns their stage names.

    A score stage reads the ``influence:`` section, so GraNd / EL2N follow its
    ``score_model`` / ``early_epochs`` / ``early_inits`` (trained surrogate, or Paul et al.'s
    early-training average); those keys are part of the score stage's reuse key only."""
    names = []
    for kind, filename in score_stages(methods):
        name = f"influence:{kind}"
        wired[name] = {
            **wired["influence"],
            "score": kind,
            "out": f"{wired['influence']['run']}/{filename}",
        }
        names.append(name)
    return names


def uses_llm_reps(pipe: PipelineConfig, sections: dict, method: str) -> bool:
    """Whether a selection by ``method`` reads the ``user_reps`` stage's file: ``tfdcon``,
    unless ``pipeline.tfdcon_llm_reps`` is off or ``select.llm_reps`` names a file already."""
    return (
        method == "tfdcon"
        and pipe.tfdcon_llm_reps
        and not (sections.get("select") or {}).get("llm_reps")
    )


def wire_llm_reps(select_section: dict, wired: dict, on: bool) -> dict:
    """``select_section`` reading the ``user_reps`` output as ``llm_reps`` when ``on``."""
    if on:
        select_section["llm_reps"] = wired["user_reps"]["out"]
    return select_section


def stage_argv(stage: str, section: dict, resolved: Path) -> list[str]:
    """``dealrec`` arguments of ``stage``: its command reading ``resolved``; a score stage
    (``influence:KIND``) sets its score and output by flags."""
    if stage.startswith("influence:"):
        return [
            "influence",
            "--config",
            str(resolved),
            "--score",
            section["score"],
            "--out",
            section["out"],
        ]
    return [STAGE[stage].command, "--config", str(resolved)]


def stage_output(stage: str, section: dict) -> Path:
    """The file whose presence means ``stage`` finished: its output, or for a folder the file
    in it that :attr:`jaxrec.stages.Stage.done` names."""
    done = base_stage(stage).done if stage.partition(":")[0] in STAGE else ""
    return Path(section["out"]) / done if done else Path(section["out"])


def stage_seconds(stage: str, section: dict, wall: float) -> float:
    """Seconds to record for a finished ``stage`` whose last invocation took ``wall`` s.

    A fine-tune or surrogate resumed after an interruption (a killed session, a lost machine)
    ran in several invocations; only its own record knows the total (``train_record.json``'s
    seconds; the surrogate's ``metrics.json``: seconds per epoch x epochs run), so the larger
    of the two is kept. Table 3's time ratio depends on it.
    """
    record = stage_output(stage, section)
    if stage not in ("finetune", "surrogate") or not record.is_file():
        return round(float(wall), 1)
    m = json.loads(record.read_text())
    if stage == "finetune":
        total = float(m.get("seconds") or 0.0)
    else:
        total = float(m.get("seconds_per_epoch") or 0.0) * int(m.get("epochs_run") or 0)
    return round(max(float(wall), total), 1)


def digest(obj: object) -> str:
    """A 16-hex-digit SHA-256 of ``obj`` as sorted JSON: the reuse keys' hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- running
def resolved_options(stage: str, section: dict) -> dict:
    """``section`` over the defaults of ``stage``'s config class (a score stage
    ``influence:KIND`` has the influence stage's): every option the stage will run with, flat
    (a nested options object under its fields' flat names, :func:`~jaxrec.config_io.flat_options`:
    the form reuse keys were archived in)."""
    cls = config_classes()[stage.partition(":")[0]]
    return flat_options(cls, section)


# options that wire() / experiment cells set to paths under the workdir
WIRED_PATHS = frozenset(
    {"out", "run", "influence", "effort", "selection", "adapter", "semantic_ids", "llm_reps"}
)


def at_since_default(fields: Iterable[dataclasses.Field], name: str, value: object) -> bool:
    """Whether option ``name`` was marked ``since`` (:func:`jaxrec.config_io.option`) and has its
    default ``value``: such an option is left out of reuse keys."""
    for f in fields:
        if f.name == name and f.metadata.get("since"):
            factory = cast(Callable[[], object], f.default_factory)  # when there is no default
            default = factory() if f.default is dataclasses.MISSING else f.default
            return value == default
    return False


def key_options(stage: str, section: dict) -> dict:
    """The options of ``stage`` that its reuse key covers: all of them, defaults included, so
    a run made before a default changed (say ``surrogate.arch`` or ``influence.negative_draws``)
    is redone rather than silently reused; except that the ``influence`` stage ignores
    :data:`BASELINE_SCORE_KEYS` (only the ``influence:grand`` / ``influence:el2n`` score
    stages, which copy the section, read them). A stage unknown to :func:`config_classes`
    (tests' stand-ins) keys on ``section`` as given. An option marked ``since`` in its config
    class is left out while at its default, so adding it keeps archived runs valid; one marked
    ``keyed_as`` keys as that value whatever its own (:func:`jaxrec.config_io.keyed_value`). Of the
    paths in :data:`WIRED_PATHS` only the file name is keyed, so keys do not depend on the
    workdir."""
    known = stage.partition(":")[0] in config_classes()
    options = resolved_options(stage, section) if known else section
    if known:
        fields = dataclasses.fields(config_classes()[stage.partition(":")[0]])
        # options that do not change results (resume, a cache folder) key as archived keys did
        by_name = {f.name: f for f in fields}
        options = {k: keyed_value(by_name[k], v) if k in by_name else v for k, v in options.items()}
        # options added later, at the default that keeps the earlier behaviour
        options = {k: v for k, v in options.items() if not at_since_default(fields, k, v)}
    # the paths wire() fills in name files under the workdir: only their names are keyed, so a
    # run is found whatever workdir it ran in (the hash chain already covers what they hold)
    options = {
        k: Path(v).name if k in WIRED_PATHS and isinstance(v, str) else v
        for k, v in options.items()
    }
    if stage != "influence":
        return options
    return {k: v for k, v in options.items() if k not in BASELINE_SCORE_KEYS}


def baseline_score_options(wired: dict, method: str) -> list:
    """``[{key: value}]`` of the :data:`BASELINE_SCORE_KEYS` (defaults included) of
    ``wired["influence"]`` when ``method`` reads GraNd or EL2N scores, else ``[]``: what an
    experiment adds to such a method's upstream key."""
    if not {"grand", "el2n"} & set(REQUIRES[method]):
        return []
    options = resolved_options("influence", wired["influence"])
    return [{k: options[k] for k in BASELINE_SCORE_KEYS}]


def shared_key(stage: str, wired: dict) -> str:
    """The reuse key of shared ``stage``: a hash of its resolved options and of the keys of
    the shared stages it reads (:func:`jaxrec.stages.stage_inputs`, those in ``wired``), and
    of nothing else, so its output is reused whichever other stages ran with it (``--stages
    semantic_ids`` alone, or an experiment whose methods need no surrogate)."""
    reads = stage_inputs(stage, wired[stage])
    inputs = [shared_key(s, wired) for s in reads if s in wired]
    return digest([digest(inputs) if inputs else "", stage, key_options(stage, wired[stage])])


def stage_keys(stages: list[str], wired: dict, upstream: str = "") -> dict[str, str]:
    """The reuse key of each stage. A shared stage's is :func:`shared_key`; any other stage's
    is a hash of its resolved options chained over the stages before it (and ``upstream``),
    so changing any earlier stage invalidates the later ones."""
    keys, key = {}, upstream
    for stage in stages:
        if stage.partition(":")[0] in SHARED_INPUTS:
            keys[stage] = shared_key(stage, wired)
            key = digest([key, keys[stage]])
        else:
            key = keys[stage] = digest([key, stage, key_options(stage, wired[stage])])
    return keys


def stages_finished(stages: list[str], wired: dict, state_file: Path, upstream: str = "") -> bool:
    """Whether every stage's output exists and was made with the current options."""
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return all(
        stage_output(s, wired[s]).exists() and state.get(s, {}).get("key") == k
        for s, k in stage_keys(stages, wired, upstream).items()
    )


def run_stages(
    stages: list[str],
    wired: dict,
    workdir: Path,
    log: RunLog,
    state_file: Path | None = None,
    upstream: str = "",
) -> dict:
    """Run (or reuse) ``stages`` in order; return ``{stage: seconds}``."""
    state_file = state_file or workdir / "stages.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    resolved = state_file.with_name("resolved.yaml")
    resolved.write_text(yaml.safe_dump(wired, sort_keys=False))
    timings = {}
    keys = stage_keys(stages, wired, upstream)
    for i, stage in enumerate(stages, start=1):
        key = keys[stage]
        output = stage_output(stage, wired[stage])
        if output.exists() and state.get(stage, {}).get("key") == key:
            log.say(f"[{i}/{len(stages)}] {stage}: reusing {output}")
            timings[stage] = state[stage].get("seconds", 0.0)
            continue
        argv = stage_argv(stage, wired[stage], resolved)
        log.say(f"[{i}/{len(stages)}] {stage}: dealrec {argv[0]}")
        t0 = time.perf_counter()
        log.run(argv)
        timings[stage] = stage_seconds(stage, wired[stage], time.perf_counter() - t0)
        state[stage] = {"key": key, "seconds": timings[stage], "output": str(output)}
        state_file.write_text(json.dumps(state, indent=2))
        log.say(f"[{i}/{len(stages)}] {stage}: done in {timings[stage]:.0f} s")
    return timings


class Workdir(NamedTuple):
    """A prepared workdir: its path, the dataset folder the stages read (the user slice in it,
    or ``pipeline.data``) and its log."""

    path: Path
    data: str
    log: RunLog


def prepare_workdir(data: dict, args: PipelineArgs) -> Workdir:
    """Create the workdir and cut the user slice if asked."""
    pipe: PipelineConfig = data["pipeline"]
    workdir = Path(args.workdir or pipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = RunLog(workdir / "run.log")
    dataset = pipe.data
    if pipe.users > 0:
        sliced = workdir / "data"
        if not (sliced / "items.jsonl").is_file():
            log.say(f"slicing {pipe.users} users of {pipe.data} (seed {pipe.slice_seed})")
            write_user_subset(
                load_dataset(pipe.data),
                sliced,
                n_users=pipe.users,
                seed=pipe.slice_seed,
                only_their_items=pipe.slice_items,
            )
        dataset = str(sliced)
    return Workdir(workdir, dataset, log)


def main(args: PipelineArgs) -> int:
    data = read_experiment_file(args.config)
    workdir, dataset, log = prepare_workdir(data, args)
    pipe: PipelineConfig = data["pipeline"]
    stages = pipe.active(args.stages)
    wired = wire(data, workdir, dataset, pipe.backend)
    llm_reps = uses_llm_reps(pipe, data, wired["select"].get("method", "dealrec"))
    wire_llm_reps(wired["select"], wired, llm_reps)
    if not llm_reps and "user_reps" in stages:
        stages.remove("user_reps")
    log.say(f"dealrec run {args.config} ({pipe.backend}): stages {', '.join(stages)} in {workdir}")
    t0 = time.perf_counter()
    order = list(stages)
    if "select" in order:
        order[order.index("select") : order.index("select")] = add_score_stages(
            wired, [wired["select"].get("method", "dealrec")]
        )
    timings = run_stages(order, wired, workdir, log)
    log.say(
        f"pipeline done in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    )
    metrics = Path(wired["evaluate"]["out"])
    if metrics.is_file():
        print(metrics.read_text())
    return 0
