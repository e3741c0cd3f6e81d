"""The one ``dealrec`` command line.

Each subcommand names its typed config (a dataclass) and the function that runs it; both are
imported only when that subcommand runs, so ``dealrec effort`` never imports JAX and
``dealrec influence`` never imports PyTorch. A :class:`~jaxrec.errors.UserError` becomes one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from jaxrec.errors import UserError

# name: (config class, config-file section, runner, help)
COMMANDS = {
    "prepare": (
        "jaxrec.config:PrepareConfig",
        "prepare",
        "jaxrec.data.prepare:main",
        "raw Amazon reviews -> a dataset folder (ratings >= 4, k-core, 8:1:1 by time)",
    ),
    "train-surrogate": (
        "jaxrec.config:SurrogateConfig",
        "surrogate",
        "jaxrec.train:main",
        "train the Flax SASRec surrogate",
    ),
    "evaluate-surrogate": (
        "jaxrec.config:SurrogateEvalConfig",
        "surrogate_eval",
        "jaxrec.train:evaluate_main",
        "full-ranking Recall/NDCG of a trained surrogate",
    ),
    "influence": (
        "jaxrec.config:InfluenceConfig",
        "influence",
        "jaxrec.influence.cli:main",
        "influence (or GraNd / EL2N) score of every training sample",
    ),
    "lds": (
        "jaxrec.config:LdsConfig",
        "lds",
        "jaxrec.lds:main",
        "linear datamodeling score of influence approximations (retrains on random subsets)",
    ),
    "select": (
        "jaxrec.config:SelectConfig",
        "select",
        "jaxrec.select.cli:main",
        "choose a few-shot subset (DEALRec or a baseline)",
    ),
    "semantic-ids": (
        "llm_bridge.config:SemanticIdConfig",
        "semantic_ids",
        "llm_bridge.tiger.semantic_ids:main",
        "TIGER's item codes: content embeddings -> RQ-VAE (or residual k-means)",
    ),
    "effort": (
        "llm_bridge.config:EffortConfig",
        "effort",
        "llm_bridge.effort:main",
        "effort score (gradient norm of the backend's loss) of every training sample",
    ),
    "user-reps": (
        "llm_bridge.config:UserRepsConfig",
        "user_reps",
        "llm_bridge.user_reps:main",
        "TF-DCon's LLM half: an LLM embedding of every user's prompt (for select --llm-reps)",
    ),
    "finetune": (
        "llm_bridge.config:FinetuneConfig",
        "finetune",
        "llm_bridge.finetune:main",
        "few-shot fine-tune of the backend (BIGRec LoRA or TIGER) on a selection",
    ),
    "evaluate": (
        "llm_bridge.config:EvaluateConfig",
        "evaluate",
        "llm_bridge.evaluate:main",
        "generate, map to items, Recall/NDCG@K of the fine-tuned backend",
    ),
    "run": (
        "jaxrec.pipeline:PipelineArgs",
        None,
        "jaxrec.pipeline:main",
        "the whole pipeline from one config file",
    ),
    "experiment": (
        "jaxrec.experiment:ExperimentArgs",
        None,
        "jaxrec.experiment:main",
        "selection methods x seeds (x a sweep grid) through finetune + evaluate",
    ),
    "doctor": (
        "jaxrec.doctor:DoctorArgs",
        None,
        "jaxrec.doctor:main",
        "what each side will run on: JAX and torch devices, threads, memory, embedded models",
    ),
    "report": (
        "jaxrec.pipeline:ReportArgs",
        None,
        "jaxrec.report:main",
        "PNG plots of a pipeline workdir (scores, selection) or of an experiment folder "
        "(the paper's Figures 4-7 and Table 3)",
    ),
}


# config-file sections that no stage command reads: ``dealrec run`` / ``experiment`` check them
PIPELINE_SECTIONS = ("pipeline", "experiment")


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def section_classes() -> dict:
    """Every section a config file may hold -> the config class that reads it (``None``: a
    section only ``run`` / ``experiment`` read). A command given a file checks all of them
    (:func:`jaxrec.config.check_sections`)."""
    classes = dict.fromkeys(PIPELINE_SECTIONS)
    for cfg_ref, section, _runner, _help in COMMANDS.values():
        if section is not None:
            try:
                classes[section] = _load(cfg_ref)
            except (ImportError, AttributeError):
                classes[section] = None  # not in this build
    return classes


def build_parser() -> argparse.ArgumentParser:
    from jaxrec.config import add_config_arguments

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
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg_ref, section, runner_ref, _ = COMMANDS[args.command]
    from jaxrec.config import flag_words

    cls = None
    try:
        cls = _load(cfg_ref)
        if hasattr(cls, "from_args"):
            cfg = cls.from_args(args)
        else:
            from jaxrec.config import config_from_args

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
