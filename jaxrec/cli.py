"""The one ``dealrec`` command line.

Each subcommand names its typed config (a dataclass) and the function that runs it; both are
imported only when that subcommand runs, so ``dealrec effort`` never imports JAX and
``dealrec influence`` never imports PyTorch. A :class:`~jaxrec.errors.UserError` becomes one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxrec.config_io import add_config_arguments, config_from_args, flag_words
from jaxrec.errors import UserError
from jaxrec.stages import PIPELINE, Command, load

# the commands that are not pipeline stages (those are in jaxrec.stages.PIPELINE)
TOOLS = {
    "prepare": Command(
        "jaxrec.config:PrepareConfig",
        "prepare",
        "jaxrec.data.prepare:main",
        "raw Amazon reviews -> a dataset folder (ratings >= 4, k-core, 8:1:1 by time)",
    ),
    "evaluate-surrogate": Command(
        "jaxrec.config:SurrogateEvalConfig",
        "surrogate_eval",
        "jaxrec.train:evaluate_main",
        "full-ranking Recall/NDCG of a trained surrogate",
    ),
    "lds": Command(
        "jaxrec.config:LdsConfig",
        "lds",
        "jaxrec.lds:main",
        "linear datamodeling score of influence approximations (retrains on random subsets)",
    ),
    "run": Command(
        "jaxrec.pipeline:PipelineArgs",
        None,
        "jaxrec.pipeline:main",
        "the whole pipeline from one config file",
    ),
    "experiment": Command(
        "jaxrec.experiment:ExperimentArgs",
        None,
        "jaxrec.experiment:main",
        "selection methods x seeds (x a sweep grid) through finetune + evaluate",
    ),
    "doctor": Command(
        "jaxrec.doctor:DoctorArgs",
        None,
        "jaxrec.doctor:main",
        "what each side will run on: JAX and torch devices, threads, memory, embedded models",
    ),
    "report": Command(
        "jaxrec.report:ReportArgs",
        None,
        "jaxrec.report:main",
        "PNG plots of a pipeline workdir (scores, selection) or of an experiment folder "
        "(the paper's Figures 4-7 and Table 3)",
    ),
}
# every subcommand: prepare, the pipeline's stages in order, then the other tools
COMMANDS: dict[str, Command] = {
    "prepare": TOOLS["prepare"],
    **{stage.command: stage.cli for stage in PIPELINE},
    **{name: command for name, command in TOOLS.items() if name != "prepare"},
}


# config-file sections that no stage command reads: ``dealrec run`` / ``experiment`` check them
PIPELINE_SECTIONS = ("pipeline", "experiment")


_load = load  # the name tests use


def section_classes() -> dict[str, type | None]:
    """Every section a config file may hold -> the config class that reads it (``None``: a
    section only ``run`` / ``experiment`` read). A command given a file checks all of them
    (:func:`jaxrec.config_io.check_sections`)."""
    classes: dict[str, type | None] = dict.fromkeys(PIPELINE_SECTIONS)
    for cfg_ref, section, _runner, _help in COMMANDS.values():
        if section is not None:
            try:
                classes[section] = _load(cfg_ref)
            except (ImportError, AttributeError):
                classes[section] = None  # not in this build
    return classes


def build_parser() -> argparse.ArgumentParser:
    """The ``dealrec`` parser: a subparser per command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="dealrec",
        description="DEALRec's data-efficient fine-tuning of LLM recommenders: one command "
        "per stage, `dealrec run CONFIG` for the whole pipeline, `dealrec doctor` for what "
        "each side will run on.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cfg_ref, _section, _runner, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            cls = _load(cfg_ref)
        except (ImportError, AttributeError):
            continue  # subcommand not available in this build
        if hasattr(cls, "add_arguments"):
            cls.add_arguments(p)
        else:
            add_config_arguments(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dealrec ARGV``.

    Args:
      argv: the arguments after ``dealrec`` (``None``: ``sys.argv[1:]``).
    Returns:
      the exit status: the runner's (0), 2 for a :class:`~jaxrec.errors.UserError`, 130 when
      interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg_ref, section, runner_ref, _ = COMMANDS[args.command]
    cls = None
    try:
        cls = _load(cfg_ref)
        if hasattr(cls, "from_args"):
            cfg = cls.from_args(args)
        else:
            assert section is not None  # a command without from_args reads a section
            cfg = config_from_args(cls, args, section, section_classes())
        runner = _load(runner_ref)
        return int(runner(cfg) or 0)
    except UserError as e:
        message = flag_words(str(e), cls) if dataclasses.is_dataclass(cls) else str(e)
        print(f"dealrec {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dealrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
