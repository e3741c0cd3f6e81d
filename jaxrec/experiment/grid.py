"""The experiment's configuration and grid: the ``experiment:`` section, the command line, the
cells (method x seed x grid point) and the checks made before anything runs (their run folders
and wired options: :mod:`jaxrec.experiment.folders`)."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import yaml

from jaxrec.config_io import help_of, make_config, option
from jaxrec.errors import UserError
from jaxrec.pipeline import (
    PipelineArgs,
    PipelineConfig,
    read_experiment_file,
)
from jaxrec.select import REQUIRES, check_method
from jaxrec.stages import PER_RUN, SELECT_INPUT_STAGE, config_classes, upstream


METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
# the mean over the evaluated users of the fine-tuned model's loss of the user's test target:
# co-primary with R@20 / N@20 (issue 23: far less noisy over seeds); lower is better
LOSS = "test_loss"
TABLE_METRICS = (*METRICS, LOSS)


def shared_reads(pipe: PipelineConfig, method: str, llm_reps: bool) -> list[str]:
    """The shared stages a run of ``method`` reads, in pipeline order: those of its selection
    inputs, ``user_reps`` when its selection reads the LLM's (``llm_reps``), and
    ``semantic_ids`` (the TIGER backend's fine-tune and evaluation; :meth:`active` drops it for
    BIGRec). Only these enter the run's reuse key, so a random run does not depend on the
    influence options."""
    made_by = {stage for i in REQUIRES[method] if (stage := SELECT_INPUT_STAGE[i])}
    wanted = {"semantic_ids", *upstream(made_by)}
    if llm_reps:
        wanted.add("user_reps")
    return pipe.active(sorted(wanted))


@dataclass
class ExperimentConfig:
    """The ``experiment:`` section of a config file."""

    methods: list[str] = option(
        ["random", "dealrec"], "selection methods to compare (select --method values)"
    )
    seeds: list[int] = option([0], "seeds of every method's select and finetune runs")
    # issue 23's Table 2: random and dealrec at 30 seeds, the DEALRec variants at 10, greedy at 3
    seeds_of: dict[str, list[int]] = option(
        {},
        "per-method seeds, {method: [seeds]}, overriding `seeds` for those methods (e.g. "
        "{greedy: [0, 1, 2]}); the others run `seeds`",
    )
    # e.g. {"select.n": [128, 256], "select.lamda": [0.1, 0.3]}
    sweep: dict = option(
        {},
        "grid over per-run options (select / finetune / evaluate keys), crossed with methods "
        "and seeds",
    )
    # the evaluated users split into this many equal groups by their test loss under the
    # `reference` method's run (same seed and grid point), easiest (lowest loss) first
    user_groups: int = option(
        0, "> 0: also report every metric per user group (paper Fig. 6); 0 = off"
    )
    baseline: str = option(
        "",
        "the method every other one is tested against (Welch over seeds; per user, paired); "
        "empty = random when it is one of the methods, else no tests; the paper's Fig. 4 "
        "compares the ablations with dealrec",
    )
    reference: str = option("random", "user_groups: the method whose test losses group the users")
    # "same": the paper's Fig. 6, so the reference run is graded on its own groups, which
    # favours it in the easy group; "next": the reference run of the next seed of `seeds`,
    # cyclic: a model neither compared run is
    reference_seed: Literal["same", "next"] = option(
        "same",
        "user_groups: which seed's reference run groups a run: same (the paper's) or next "
        "(the next seed, cyclic)",
    )
    bootstrap: int = option(
        0,
        "> 0: also a cluster bootstrap over seeds and users (this many draws) of each "
        "difference from the baseline; 0 = off",
    )
    # several studies then share one workdir: its shared stages and any run with the same options
    name: str = option(
        "", "empty = tables and figures in the workdir; NAME = in workdir/studies/NAME"
    )
    # runs/ may not outlive the machine; the archive (small: metrics and per-user arrays) can
    # be committed, and a run found there with the same options is not run again
    archive: str = option(
        "",
        "folder kept outside the workdir (e.g. committed) with every finished run's metrics "
        "and per-user arrays (jaxrec.archive); a run archived there is not rerun, and each "
        "run that finishes is added; empty = off",
    )

    def seeds_for(self, method: str) -> list[int]:
        """The seeds ``method`` runs: its ``seeds_of`` entry, else ``seeds``."""
        return list(self.seeds_of.get(method, self.seeds))

    def all_seeds(self) -> list[int]:
        """Every seed some method runs, in first-seen order."""
        return list(dict.fromkeys(s for m in self.methods for s in self.seeds_for(m)))


@dataclass
class ExperimentArgs(PipelineArgs):
    """Command line of ``dealrec experiment``: a config file, plus overrides."""

    methods: list[str] = option([], "run only these methods of the config now (the rest later)")
    seeds: list[int] = option([], "run only these seeds of the config now (the rest later)")
    points: list[str] = option(
        [],
        "run only the grid points with these swept values (section.key=value) now, as "
        "'select.n=512 select.n=2048' (the rest later)",
    )
    plan: bool = option(
        False, "say how many runs are archived, finished and to run, and about how long, then stop"
    )
    shard: str = option(
        "",
        "I/K: run only every K-th of the runs asked for, starting at the I-th (1 <= I <= K), "
        "so K machines without a shared workdir split an experiment; empty = all (processes "
        "sharing a workdir need no shards: a lock file per run keeps them apart)",
    )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        PipelineArgs.add_arguments(parser)
        parser.add_argument(
            "--methods",
            nargs="+",
            default=[],
            help=help_of(ExperimentArgs, "methods"),
        )
        parser.add_argument(
            "--seeds",
            nargs="+",
            type=int,
            default=[],
            help=help_of(ExperimentArgs, "seeds"),
        )
        parser.add_argument(
            "--points",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help=help_of(ExperimentArgs, "points"),
        )
        parser.add_argument("--plan", action="store_true", help=help_of(ExperimentArgs, "plan"))
        parser.add_argument(
            "--shard", default="", metavar="I/K", help=help_of(ExperimentArgs, "shard")
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExperimentArgs:
        return cls(
            config=args.config,
            workdir=args.workdir,
            stages=list(args.stages),
            methods=list(args.methods),
            seeds=list(args.seeds),
            points=list(args.points),
            shard=args.shard,
            plan=args.plan,
        )


@dataclass(frozen=True)
class Cell:
    """One run of the experiment: a method, a seed and a point of the sweep grid."""

    method: str
    seed: int
    point: tuple = ()  # ((key, value), ...) in the order of the sweep

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}" + "".join(f"-{k}={v}" for k, v in self.point)


# ----------------------------------------------------------------------------- the grid
def check_sweep(sweep: dict, sections: dict, source: str) -> list[tuple]:
    """Check the swept keys and values (before any stage runs); return the grid points.

    Args:
      sweep: ``{"section.key": [values]}``; sections are the per-run stages.
      sections: the config file's stage sections (the values are checked against their types).
      source: names the config in errors.
    Returns:
      every point of the grid, as ``((key, value), ...)`` tuples.
    """
    if not isinstance(sweep, dict):
        raise UserError(f"{source}: sweep must be a mapping of 'section.key' to a list of values")
    classes = config_classes()
    for key, values in sweep.items():
        section, _, name = str(key).partition(".")
        if section not in PER_RUN or not name:
            raise UserError(
                f"{source}: cannot sweep {key!r}: sweep keys are "
                f"{' / '.join(PER_RUN)} options, as 'select.n'"
            )
        if not isinstance(values, list) or not values:
            raise UserError(f"{source}: sweep {key!r} needs a non-empty list of values")
        for value in values:
            make_config(
                classes[section],
                {**(sections.get(section) or {}), name: value},
                f"{source} sweep {key}",
            )
    keys = list(sweep)
    return [tuple(zip(keys, combo)) for combo in itertools.product(*sweep.values())]


def experiment_cells(exp: ExperimentConfig, points: list[tuple]) -> list[Cell]:
    """Every run: each grid point x method x the method's seeds (``seeds_for``)."""
    return [Cell(m, s, p) for p in points for m in exp.methods for s in exp.seeds_for(m)]


class Experiment(NamedTuple):
    """A checked experiment: the config file's sections, its ``experiment:`` section and
    every cell."""

    sections: dict
    config: ExperimentConfig
    cells: list[Cell]


def read_experiment(args: ExperimentArgs) -> Experiment:
    """Read and check the whole experiment (config, methods, sweep) before anything runs."""
    data = read_experiment_file(args.config, extra_sections=("experiment",))
    source = f"{args.config} [experiment]"
    exp = make_config(ExperimentConfig, data.get("experiment") or {}, source)
    if not exp.methods or not exp.seeds:
        raise UserError(f"{source}: methods and seeds must not be empty")
    for name, values in (("methods", exp.methods), ("seeds", exp.seeds)):
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise UserError(f"{source}: {name} lists {twice[0]!r} twice")
    if exp.user_groups < 0 or (exp.user_groups and exp.reference not in exp.methods):
        raise UserError(
            f"{source}: user_groups must be >= 0 and the reference method "
            f"{exp.reference!r} one of the methods"
        )
    if exp.baseline and exp.baseline not in exp.methods:
        raise UserError(f"{source}: baseline {exp.baseline!r} is not one of the methods")
    check_seeds_of(exp, source)
    if exp.user_groups and exp.reference_seed == "next" and len(exp.seeds_for(exp.reference)) < 2:
        raise UserError(f"{source}: reference_seed 'next' needs at least 2 seeds")
    if exp.bootstrap < 0:
        raise UserError(f"{source}: bootstrap must be >= 0 (draws), got {exp.bootstrap}")
    for method in exp.methods:
        try:
            check_method(method)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
    for name, chosen, known in (
        ("--methods", args.methods, exp.methods),
        ("--seeds", args.seeds, exp.all_seeds()),
    ):
        extra = [c for c in chosen if c not in known]
        if extra:
            raise UserError(f"{name}: {extra[0]!r} is not in the config's {name[2:]} {known}")
    cells = experiment_cells(exp, check_sweep(exp.sweep, data, source))
    return Experiment(data, exp, cells)


def check_seeds_of(exp: ExperimentConfig, source: str) -> None:
    """``experiment.seeds_of``: a mapping of the experiment's methods to non-empty lists of
    distinct int seeds."""
    if not isinstance(exp.seeds_of, dict):
        raise UserError(f"{source}: seeds_of must be a mapping {{method: [seeds]}}")
    for method, seeds in exp.seeds_of.items():
        if method not in exp.methods:
            raise UserError(f"{source}: seeds_of names {method!r}, not one of the methods")
        ints = isinstance(seeds, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in seeds
        )
        if not ints or not seeds or len(set(seeds)) != len(seeds):
            raise UserError(
                f"{source}: seeds_of {method}: needs a non-empty list of distinct int seeds, "
                f"got {seeds!r}"
            )


def baseline_of(exp: ExperimentConfig) -> str:
    """The method the tests compare with: ``exp.baseline``, or ``random`` when it is empty."""
    return exp.baseline or "random"


def chosen_points(points: list[str], sweep: dict) -> dict[str, list]:
    """``--points`` as ``{swept key: [values]}``; each ``KEY=VALUE`` must name a swept key and
    one of its values in the config (``VALUE`` read as YAML: ``512`` is an int)."""
    chosen: dict[str, list] = {}
    for item in points:
        key, sep, text = item.partition("=")
        if not sep or key not in sweep:
            raise UserError(
                f"--points: {item!r} is not KEY=VALUE with KEY a swept key of the config "
                f"({', '.join(sweep) or 'no sweep'})"
            )
        value = yaml.safe_load(text)
        if value not in sweep[key]:
            raise UserError(f"--points: {value!r} is not in the config's sweep {key}: {sweep[key]}")
        chosen.setdefault(key, []).append(value)
    return chosen


def selected_cells(cells: list[Cell], args: ExperimentArgs, sweep: dict) -> list[Cell]:
    """The cells to run now: those of ``--methods``, ``--seeds`` and ``--points`` (each
    empty = all), and of them, with ``--shard I/K``, the I-th of every K (in the grid's
    order, the same in every process given the same command)."""
    points = chosen_points(args.points, sweep)
    chosen = [
        c
        for c in cells
        if (not args.methods or c.method in args.methods)
        and (not args.seeds or c.seed in args.seeds)
        and all(v in points[k] for k, v in c.point if k in points)
    ]
    if not args.shard:
        return chosen
    index, count = parse_shard(args.shard)
    return chosen[index - 1 :: count]


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/K`` as ``(I, K)``, 1 <= I <= K."""
    i, sep, k = text.partition("/")
    try:
        index, count = int(i), int(k)
    except ValueError:
        index, count = 0, 0
    if not sep or not 1 <= index <= count:
        raise UserError(f"--shard: {text!r} is not I/K with 1 <= I <= K, as 1/2")
    return index, count
