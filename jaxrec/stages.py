"""The pipeline's stages: one record each, the one table that ``dealrec`` (:mod:`jaxrec.cli`),
``dealrec run`` (:mod:`jaxrec.pipeline`) and ``dealrec experiment`` (:mod:`jaxrec.experiment`)
read.

A :class:`Stage` names its ``dealrec`` subcommand, its config class and runner (as
``"module:name"`` references, imported only when used, so building the command line imports
neither JAX nor PyTorch), the stages whose outputs it reads, its output under the workdir (or
under a run folder), whether an experiment runs it once (shared) or per run, and the backends
it runs for. Standard library only.

    surrogate -> influence -> [semantic_ids] -> effort -> [user_reps] -> select -> finetune
    -> evaluate
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, NamedTuple, get_args

from llm_bridge.config import Backend

#: the backends' names: one home, ``llm_bridge.config.Backend`` (``llm_bridge.backend`` maps
#: each to its implementation)
BACKENDS: tuple[str, ...] = get_args(Backend)


class Command(NamedTuple):
    """A ``dealrec`` subcommand: its typed config, the config-file section it reads, the
    function that runs it and its help line."""

    config: str  # "module:Class"
    section: str | None  # None: a command that reads no stage section (run, experiment, ...)
    runner: str  # "module:function"
    help: str


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
      name: the stage, and the config-file section its options live in.
      command: the ``dealrec`` subcommand that runs it.
      config: its config class, ``"module:Class"``.
      runner: the function the subcommand calls, ``"module:function"``.
      help: the subcommand's help line.
      inputs: the stages whose outputs it reads (a shared stage's reuse key covers theirs).
      backend_inputs: stages it reads only under a backend whose pipeline has them
        (``user_reps`` reads ``semantic_ids`` under TIGER only); a shared stage's reuse key
        covers them only then (:func:`stage_inputs`), so keys made before it read them hold.
      output: its output (``out``), a file or folder name under the workdir (a shared stage) or
        under the run folder (a per-run stage).
      done: for a folder output, the file in it whose presence means the stage finished.
      shared: an experiment runs it once for all runs (else once per run: select, finetune,
        evaluate).
      backends: the backends whose pipeline has it (``semantic_ids``: TIGER only).
      takes_backend: its config has ``backend`` (and ``semantic_ids``), set by the pipeline.
    """

    name: str
    command: str
    config: str
    runner: str
    help: str
    inputs: tuple[str, ...]
    output: str
    shared: bool
    done: str = ""
    backends: tuple[str, ...] = BACKENDS
    takes_backend: bool = False
    backend_inputs: tuple[str, ...] = ()

    @property
    def cli(self) -> Command:
        """The stage's subcommand, as :data:`jaxrec.cli.COMMANDS` holds it."""
        return Command(self.config, self.name, self.runner, self.help)


PIPELINE: tuple[Stage, ...] = (
    Stage(
        "surrogate",
        "train-surrogate",
        "jaxrec.config:SurrogateConfig",
        "jaxrec.train:main",
        "train the Flax SASRec surrogate",
        inputs=(),
        output="surrogate",
        done="metrics.json",
        shared=True,
    ),
    Stage(
        "influence",
        "influence",
        "jaxrec.config:InfluenceConfig",
        "jaxrec.influence.cli:main",
        "influence (or GraNd / EL2N) score of every training sample",
        inputs=("surrogate",),
        output="influence.npy",
        shared=True,
    ),
    Stage(
        "semantic_ids",
        "semantic-ids",
        "llm_bridge.config:SemanticIdConfig",
        "llm_bridge.tiger.semantic_ids:main",
        "TIGER's item codes: content embeddings -> RQ-VAE (or residual k-means)",
        inputs=(),
        output="semantic_ids.npy",
        shared=True,
        backends=("tiger",),
    ),
    Stage(
        "effort",
        "effort",
        "llm_bridge.config:EffortConfig",
        "llm_bridge.effort:main",
        "effort score (gradient norm of the backend's loss) of every training sample",
        inputs=("semantic_ids",),  # TIGER's effort reads the semantic IDs
        output="effort.npy",
        shared=True,
        takes_backend=True,
    ),
    Stage(
        "user_reps",
        "user-reps",
        "llm_bridge.config:UserRepsConfig",
        "llm_bridge.user_reps:main",
        "TF-DCon's LLM half: the backend's embedding of every user's history "
        "(for select --llm-reps)",
        inputs=(),
        output="llm_reps.npy",
        shared=True,
        takes_backend=True,
        backend_inputs=("semantic_ids",),  # TIGER's T5 reads the semantic IDs
    ),
    Stage(
        "select",
        "select",
        "jaxrec.config:SelectConfig",
        "jaxrec.select.cli:main",
        "choose a few-shot subset (DEALRec or a baseline)",
        inputs=("surrogate", "influence", "effort", "user_reps"),  # as the method needs
        output="selected.npy",
        shared=False,
    ),
    Stage(
        "finetune",
        "finetune",
        "llm_bridge.config:FinetuneConfig",
        "llm_bridge.finetune:main",
        "few-shot fine-tune of the backend (BIGRec LoRA or TIGER) on a selection",
        inputs=("select", "semantic_ids"),
        output="adapter",
        done="train_record.json",
        shared=False,
        takes_backend=True,
    ),
    Stage(
        "evaluate",
        "evaluate",
        "llm_bridge.config:EvaluateConfig",
        "llm_bridge.evaluate:main",
        "generate, map to items, Recall/NDCG@K of the fine-tuned backend",
        inputs=("finetune", "semantic_ids"),
        output="metrics.json",
        shared=False,
        takes_backend=True,
    ),
)

#: stage name -> its record
STAGE: dict[str, Stage] = {s.name: s for s in PIPELINE}
#: the stages in pipeline order
STAGES: tuple[str, ...] = tuple(STAGE)
#: the stages an experiment runs once, and those it runs per run (cell)
SHARED: tuple[str, ...] = tuple(s.name for s in PIPELINE if s.shared)
PER_RUN: tuple[str, ...] = tuple(s.name for s in PIPELINE if not s.shared)
#: the stages whose config has ``backend``
BACKEND_STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE if s.takes_backend)
#: the shared stages each shared stage reads (a score stage ``influence:KIND`` reads the
#: surrogate, as the influence stage)
SHARED_INPUTS: dict[str, tuple[str, ...]] = {s.name: s.inputs for s in PIPELINE if s.shared}
#: the stage whose output holds each input of a selection (``jaxrec.select.REQUIRES`` names
#: them): GraNd, EL2N and representations are score files in the surrogate's run folder
#: (``dealrec influence --score KIND``); ``interactions`` come from the dataset
SELECT_INPUT_STAGE: dict[str, str | None] = {
    "influence": "influence",
    "effort": "effort",
    "grand": "surrogate",
    "el2n": "surrogate",
    "representations": "surrogate",
    "interactions": None,
}


def base_stage(stage: str) -> Stage:
    """The record of ``stage``; a score stage ``influence:KIND`` has the influence stage's."""
    return STAGE[stage.partition(":")[0]]


def stage_inputs(stage: str, section: dict) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` reads when run with ``section``: its ``inputs``, and
    those of its ``backend_inputs`` that the pipeline of ``section``'s backend has."""
    s = base_stage(stage)
    backend = section.get("backend")
    return s.inputs + tuple(i for i in s.backend_inputs if backend in STAGE[i].backends)


def upstream(stages: set[str] | list[str] | tuple[str, ...]) -> set[str]:
    """``stages`` and every stage they read, directly or through others."""
    found: set[str] = set()
    todo = list(stages)
    while todo:
        s = todo.pop()
        if s not in found:
            found.add(s)
            todo.extend(STAGE[s].inputs)
    return found


def load(ref: str) -> Any:
    """The object that a ``"module:name"`` reference names (importing the module)."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def config_classes() -> dict[str, Any]:
    """The typed config class (a dataclass type) of each stage, in pipeline order."""
    return {s.name: load(s.config) for s in PIPELINE}


def stage_table() -> str:
    """The stages as the Markdown table that ``docs/architecture.md`` shows (a test checks
    that the page holds exactly this table)."""
    rows = [
        "| stage | command | config | reads (besides the dataset) | writes | runs | backends |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in PIPELINE:
        only = [f"`{i}` ({', '.join(STAGE[i].backends)})" for i in s.backend_inputs]
        reads = ", ".join([f"`{i}`" for i in s.inputs] + only) or "-"
        writes = f"`{s.output}/` (done: `{s.done}`)" if s.done else f"`{s.output}`"
        runs = "once (shared)" if s.shared else "per run"
        rows.append(
            f"| `{s.name}` | `dealrec {s.command}` | `{s.config.split(':')[1]}` | {reads} | "
            f"{writes} | {runs} | {', '.join(s.backends)} |"
        )
    return "\n".join(rows)
