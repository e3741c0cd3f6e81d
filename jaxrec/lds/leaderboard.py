"""The LDS leaderboard (issue 27, section 3): one ``dealrec lds`` study per surrogate x Games
slice, every estimator on the same retrains of each, from one config file::

    python -m jaxrec.lds.leaderboard configs/studies/lds_leaderboard.yaml --plan   # the runs
    python -m jaxrec.lds.leaderboard configs/studies/lds_leaderboard.yaml          # run them

The file holds an ``lds`` section (the options every study shares) and an ``lds_leaderboard``
section: ``models`` (surrogate -> its own ``lds`` options, say its parameter block),
``slices`` (the seeds that pick each Games slice, its subsets, validation users and
initialisation) and ``out`` (each study writes ``OUT/{model}_m{subsets}_s{slice}``, the names
of ``results/lds/``). The studies run one after another; each resumes from its caches.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from jaxrec.config import LdsConfig
from jaxrec.config_io import flat_values, load_config_file, make_config, option
from jaxrec.errors import UserError
from jaxrec.lds.study import check_options
from jaxrec.lds.study import main as run_study

SECTIONS = ("lds", "lds_leaderboard")


@dataclass
class LeaderboardConfig:
    """The ``lds_leaderboard`` section: the grid of LDS studies."""

    models: dict = option({"sasrec": {}}, "surrogate -> its own lds options (say params)")
    slices: list[int] = option([0, 1], "seeds of the Games slices (lds seed)")
    out: str = option("results/lds", "folder of the studies' folders")


def plan(path: str | Path) -> list[LdsConfig]:
    """The studies of leaderboard file ``path``, in run order (model, then slice): each the
    ``lds`` section with the model's own options, ``model``, ``seed`` = the slice and its
    ``out``. Every study's options are checked (unknown keys, types, attribution names) here,
    before anything runs."""
    data = load_config_file(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    base = dict(data.get("lds") or {})
    board = make_config(LeaderboardConfig, data.get("lds_leaderboard") or {}, f"{path} [board]")
    studies = []
    for model, own in board.models.items():
        if own is not None and not isinstance(own, dict):
            raise UserError(f"{path}: models.{model} must be a mapping of lds options")
        for s in board.slices:
            values = {**base, **(own or {}), "model": model, "seed": int(s)}
            cfg = make_config(LdsConfig, values, f"{path} [{model}, slice {s}]")
            cfg = dataclasses.replace(cfg, out=str(Path(board.out) / name(cfg)))
            check_options(cfg)
            studies.append(cfg)
    return studies


def name(cfg: LdsConfig) -> str:
    """A study's folder name: ``{model}_m{subsets}_s{seed}`` (as in ``results/lds/``)."""
    return f"{cfg.model}_m{cfg.subsets}_s{cfg.seed}"


def command_line(cfg: LdsConfig) -> str:
    """The ``dealrec lds`` command line of one study (every option that differs from its
    default, as a flag; a nested option without a flat name is an error)."""
    words = ["python", "-m", "jaxrec.cli", "lds"]
    defaults = flat_values(LdsConfig())
    for name, value in flat_values(cfg).items():  # nested solver options by their flat names
        if value == defaults.get(name):
            continue
        if "." in name:
            raise UserError(f"{name}={value!r} has no flag: set it in the lds config file")
        flag = "--" + name.replace("_", "-")
        words += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return shlex.join(words)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m jaxrec.lds.leaderboard``: ``CONFIG [--plan]``."""
    ap = argparse.ArgumentParser(prog="python -m jaxrec.lds.leaderboard", description=__doc__)
    ap.add_argument("config", help="leaderboard YAML (configs/studies/lds_leaderboard.yaml)")
    ap.add_argument("--plan", action="store_true", help="print the studies' commands only")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Print the plan (``--plan``) or run every study of the file in turn."""
    args = build_parser().parse_args(argv)
    try:
        studies = plan(args.config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cfg in studies:
        print(command_line(cfg))
    if args.plan:
        return 0
    for cfg in studies:
        run_study(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
