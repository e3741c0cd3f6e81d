"""Every command line that README.md and docs/*.md show is exercised here (the project rule),
each by the parser that would read it, without running it:

* ``dealrec CMD ...`` and ``python -m jaxrec.cli CMD ...`` (the same CLI): ``build_parser``
  accepts it (flags, choices, types), and a shipped config it names is read and checked as the
  command would;
* ``python -m jaxrec.lds.leaderboard CONFIG [--plan]``: the module's own parser and plan; with
  ``--plan``, every ``dealrec lds`` line it prints parses and gives back that study's options;
* ``python bench/X.py ...``: the script's own argparse parser, in one subprocess that runs each
  script as ``__main__`` with the documented argv and stops it right after parsing;
  ``bash bench/gpu_check.sh ...`` hands its arguments to ``bench/gpu_check.py`` unchanged, so
  they are checked the same way (tests/test_gpu_check.py runs the script itself).

Command lines are taken from fenced code blocks (``\\``-continued lines joined, ``#`` comments
dropped) and from inline code spans (which may wrap), split at ``&&`` and ``;``, with shell
prefixes (``VAR=x``, ``taskset -c N``, ``nice -n N``, ``time``, ``srun --x y``, ``do``) stripped.
``test_every_shown_command_line_has_a_checker`` fails for a line that starts with ``python``,
``python3``, ``bash`` or ``dealrec`` and that no checker above claims, so that a new kind of
command in the docs cannot go unchecked."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from jaxrec.cli import COMMANDS, build_parser
from tests.support import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_PREFIX = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+|taskset\s+-c\s+\S+\s+|nice\s+-n\s+\S+\s+|do\s+|\$\s+"
    r"|time\s+|/usr/bin/time\s+-v\s+|srun(?:\s+--[\w-]+\s+\S+)*\s+)+"
)
# A row of a file-tree listing (``jaxrec/lds/   dealrec lds: ...``), not a command line.
TREE_ROW = re.compile(r"^[\w./-]+/?\s{2,}")
OURS = ("python", "python3", "bash", "dealrec")
# Shown in the docs, but not this project's commands: nothing of ours to check.
NOT_OURS = ("python -m pytest", "python3 -m pytest", "python3 -m venv")


# ----------------------------------------------------------------------------- finding them
def _commands(text: str) -> list[str]:
    """The commands of one shell line: split at ``&&`` / ``;``, shell prefixes stripped."""
    out = []
    for part in re.split(r"&&|;", text):
        part = SHELL_PREFIX.sub("", part.strip())
        if part:
            out.append(part)
    return out


def commands_in(text: str) -> list[str]:
    """The command lines of one Markdown text that start with ``python``, ``python3``,
    ``bash`` or ``dealrec`` (a bare name in prose excluded), or that name one behind a prefix
    not stripped (so that the guard sees them), from code blocks and code spans."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines += _commands(re.sub(r"(^|\s)#.*", "", line))
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        lines += _commands(" ".join(span.split()))
    found = []
    for line in lines:
        words = line.split()
        if (len(words) > 1 and words[0] in OURS) or (
            _names_a_command(words) and not TREE_ROW.match(line)
        ):
            found.append(" ".join(words))
    return found


def shown_commands() -> list[tuple[str, str]]:
    """``(file, command line)`` of every command line in README.md and docs/*.md."""
    return sorted({(path.name, line) for path in DOCS for line in commands_in(path.read_text())})


def _names_a_command(words: list[str]) -> bool:
    """``python X`` / ``bash X`` / ``dealrec CMD`` somewhere in ``words``."""
    return any(
        (w in OURS[:3] or (w == "dealrec" and nxt in COMMANDS))
        for w, nxt in zip(words, [*words[1:], ""])
        if nxt
    )


def kind_of(line: str) -> str | None:
    """Which checker reads ``line``: ``cli``, ``leaderboard``, ``bench``, ``gpu_check`` or
    ``not ours``; None for a kind of command that nothing here checks."""
    words = line.split()
    if words[0] not in OURS:
        return None  # a command behind a prefix that the finder does not strip
    if words[0] == "python3" and " ".join(words[:3]) not in NOT_OURS:
        words[0] = "python"  # the same interpreter
    if " ".join(words[:3]) in NOT_OURS:
        return "not ours"
    if (words[0] == "dealrec" and words[1] in COMMANDS) or words[:3] == [
        "python",
        "-m",
        "jaxrec.cli",
    ]:
        return "cli"
    if words[:3] == ["python", "-m", "jaxrec.lds.leaderboard"]:
        return "leaderboard"
    if words[0] == "python" and re.fullmatch(r"bench/\w+\.py", words[1]):
        return "bench"
    if words[:2] == ["bash", "bench/gpu_check.sh"]:
        return "gpu_check"
    return None


def argv_of(line: str, skip: int = 1) -> list[str]:
    """A documented line as concrete arguments after its first ``skip`` words: ``[--x A|B]``
    -> ``--x A``; ``..`` / ``...`` (and a flag whose only value it is) dropped; ``N`` ->
    ``100``; a shell variable ``$s`` -> ``0``."""
    line = line.replace("\\|", "|").replace("[", " ").replace("]", " ")
    words = shlex.split(line)[skip:]
    out: list[str] = []
    for i, w in enumerate(words):
        if w in ("..", "..."):
            if out and out[-1].startswith("--") and i and words[i - 1] == out[-1]:
                out.pop()
            continue
        w = w.split("|")[0] if "|" in w and not w.startswith("--") else w
        w = re.sub(r"\$\w+", "0", w)
        out.append("100" if w == "N" else w)
    return out


SHOWN = shown_commands()
BY_KIND: dict[str | None, list[tuple[str, str]]] = {}
for _where, _line in SHOWN:
    BY_KIND.setdefault(kind_of(_line), []).append((_where, _line))


def _ids(rows: list[tuple[str, str]]) -> list[str]:
    return [f"{f}:{x[:70]}" for f, x in rows]


def test_every_shown_command_line_has_a_checker():
    unchecked = [f"{where}: {line}" for where, line in BY_KIND.get(None, [])]
    assert not unchecked, "command lines in the docs that no test checks:\n" + "\n".join(unchecked)


def test_the_docs_show_command_lines_of_every_kind():
    assert len(BY_KIND["cli"]) > 40 and len(BY_KIND["bench"]) > 25
    assert BY_KIND["leaderboard"] and BY_KIND["gpu_check"]
    assert any(line.startswith("dealrec lds configs/") for _, line in BY_KIND["cli"])
    assert any(line.startswith("python -m jaxrec.cli ") for _, line in BY_KIND["cli"])
    # the finder reads wrapped spans, continued block lines, shell prefixes and comments
    text = (
        "Run `OMP_NUM_THREADS=1 python bench/a.py\n--n 2` or `dealrec` (prose), then:\n"
        "```bash\ntime dealrec lds c.yaml \\\n  --seed 1   # slice 1\nenv python b.py\n```\n"
        "```\njaxrec/lds/    dealrec lds: the LDS\n```\n"
    )
    assert commands_in(text) == [
        "dealrec lds c.yaml --seed 1",
        "env python b.py",  # a prefix it does not strip: kind None, the guard fails
        "python bench/a.py --n 2",
    ]
    assert _commands("for s in 0 1; do X=1 taskset -c 1 python bench/a.py --seed $s; done") == [
        "for s in 0 1",
        "python bench/a.py --seed $s",
        "done",
    ]
    # the guard's side: kinds that nothing checks
    for unchecked in ("python tools/x.py", "bash run.sh", "python -m jaxrec.other", "env python x"):
        assert kind_of(unchecked) is None, unchecked
    assert kind_of("python3 bench/a.py") == "bench" and kind_of("python3 -m venv v") == "not ours"
    assert argv_of("python bench/a.py --seed $s --x [A|B] --parts ... --n N", 2) == [
        "--seed", "0", "--x", "A", "--n", "100"
    ]  # fmt: skip


# ----------------------------------------------------------------------------- the CLI
def _cli_argv(line: str) -> list[str]:
    return argv_of(line, 1 if line.startswith("dealrec ") else 3)


@pytest.mark.parametrize("where,line", BY_KIND["cli"], ids=_ids(BY_KIND["cli"]))
def test_every_documented_command_line_parses(where, line):
    """argparse accepts it (flags, choices, types); a shipped config it names is read and
    checked as the command would (sections, keys, values, methods, seeds, points)."""
    argv = _cli_argv(line)
    if len(argv) == 1:  # a mention of the command in prose
        argv.append("--help")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"{where}: {line!r} does not parse"
        return
    config = getattr(args, "config", None) or getattr(args, "config_file", None)
    if not config or not (ROOT / config).is_file():
        return
    config = str(ROOT / config)
    if args.command == "experiment":
        from jaxrec.experiment import ExperimentArgs, chosen_points, read_experiment

        args.config = config
        _data, exp, _cells = read_experiment(ExperimentArgs.from_args(args))
        chosen_points(args.points, exp.sweep)
    elif args.command == "run":
        from jaxrec.pipeline import read_experiment_file

        read_experiment_file(config)
    else:
        from jaxrec.cli import _load, section_classes
        from jaxrec.config_io import config_from_args

        cfg_ref, section, _runner, _help = COMMANDS[args.command]
        args.config, args.config_file = config, None
        config_from_args(_load(cfg_ref), args, section, section_classes())


# ----------------------------------------------------------------------------- the leaderboard
@pytest.mark.parametrize("where,line", BY_KIND["leaderboard"], ids=_ids(BY_KIND["leaderboard"]))
def test_every_documented_leaderboard_line_parses_and_plans(where, line, capsys):
    """Its own parser accepts it and the file's studies are checked (:func:`plan`); with
    ``--plan`` (which runs nothing), each printed ``dealrec lds`` line parses with the CLI
    parser and its flags give back that study's options exactly."""
    from jaxrec.config import LdsConfig
    from jaxrec.config_io import config_from_args
    from jaxrec.lds import leaderboard

    argv = argv_of(line, 3)
    args = leaderboard.build_parser().parse_args(argv)
    studies = leaderboard.plan(ROOT / args.config)
    if not args.plan:
        return
    assert leaderboard.main([str(ROOT / args.config), "--plan"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(studies) > 0
    for shown, study in zip(printed, studies):
        assert shown.startswith("python -m jaxrec.cli lds ")
        got = config_from_args(LdsConfig, build_parser().parse_args(argv_of(shown, 3)), "lds")
        assert got == study, shown


# ----------------------------------------------------------------------------- bench scripts
def _bench_argv(line: str) -> tuple[str, list[str]]:
    """``(script, argv)``; ``bash bench/gpu_check.sh ARGS`` is ``bench/gpu_check.py ARGS``."""
    words = line.split()
    if words[0] == "bash":
        return "bench/gpu_check.py", argv_of(line, 2)
    return words[1], argv_of(line, 2)


# Runs each script as ``__main__`` with the documented argv (as ``python bench/X.py`` would:
# bench/ first on sys.path), every top-level ``parse_args`` / ``parse_known_args`` stopping the
# script with ``Parsed`` right after a successful parse: nothing past the parser runs.
_RUNNER = r"""
import argparse, contextlib, io, json, runpy, sys

class Parsed(Exception):
    pass

depth = 0

def stop_after(method):
    def parse(self, *a, **k):
        global depth
        depth += 1
        try:
            result = method(self, *a, **k)
        finally:
            depth -= 1
        if depth == 0:
            raise Parsed(result)
        return result
    return parse

argparse.ArgumentParser.parse_args = stop_after(argparse.ArgumentParser.parse_args)
argparse.ArgumentParser.parse_known_args = stop_after(argparse.ArgumentParser.parse_known_args)
sys.path.insert(0, "bench")
results = []
for script, argv in json.load(sys.stdin):
    sys.argv = [script, *argv]
    err = io.StringIO()
    row = {"script": script, "argv": argv}
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        row["error"] = "the script ran to its end without parsing its arguments"
    except Parsed as p:
        parsed = p.args[0]
        row["extra"] = parsed[1] if isinstance(parsed, tuple) else []
    except SystemExit as e:
        if e.code not in (0, None):
            row["error"] = f"exit {e.code}: {err.getvalue().strip()[-500:]}"
    except BaseException as e:
        row["error"] = f"{type(e).__name__}: {e}"
    results.append(row)
print(json.dumps(results))
"""

# bench scripts that hand the options they do not know to a dealrec command: those must parse
# as that command's flags.
BENCH = BY_KIND["bench"] + BY_KIND["gpu_check"]
FORWARDS = {"bench/hosts.py": ["influence", "--run", "RUN", "--out", "x.npy"]}


@pytest.fixture(scope="module")
def bench_parses() -> dict[tuple[str, tuple[str, ...]], dict]:
    """Every documented bench line through its script's parser, in one process."""
    jobs = sorted({(s, tuple(a)) for s, a in (_bench_argv(line) for _, line in BENCH)})
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(jobs), capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(r["script"], tuple(r["argv"])): r for r in json.loads(proc.stdout)}


@pytest.mark.parametrize("where,line", BENCH, ids=_ids(BENCH))
def test_every_documented_bench_line_parses(where, line, bench_parses):
    script, argv = _bench_argv(line)
    row = bench_parses[(script, tuple(argv))]
    assert "error" not in row, f"{where}: {line!r}: {row['error']}"
    extra = row.get("extra", [])
    if script in FORWARDS:
        build_parser().parse_args([*FORWARDS[script], *extra])
    else:
        assert not extra, f"{where}: {line!r}: unknown arguments {extra}"


def test_gpu_check_sh_hands_its_arguments_to_gpu_check_py_and_is_run_by_a_test():
    """The documented ``bash bench/gpu_check.sh ARGS`` is ``bench/gpu_check.py ARGS`` (checked
    above); tests/test_gpu_check.py runs the shell script itself, end to end."""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert re.search(r'^exec "\$PY" bench/gpu_check\.py "\$@"$', script, re.M)
    assert '"bench" / "gpu_check.sh"' in (ROOT / "tests" / "test_gpu_check.py").read_text()


def test_the_bench_runner_stops_after_parsing_and_reports_bad_flags(tmp_path):
    """The runner above on a script that would write a file after parsing: a good argv stops
    before the write; a bad flag is reported with argparse's message."""
    (tmp_path / "bench").mkdir()
    marker = tmp_path / "ran"
    (tmp_path / "bench" / "x.py").write_text(
        "import argparse, pathlib\n"
        "def main():\n"
        "    ap = argparse.ArgumentParser()\n"
        "    sub = ap.add_subparsers(dest='cmd', required=True)\n"
        "    sub.add_parser('run').add_argument('--n', type=int)\n"
        "    ap.parse_args()\n"
        f"    pathlib.Path({str(marker)!r}).write_text('x')\n"
        "if __name__ == '__main__':\n"
        "    main()\n"
    )
    jobs = [["bench/x.py", ["run", "--n", "3"]], ["bench/x.py", ["run", "--m", "3"]]]
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER], input=json.dumps(jobs), capture_output=True, text=True,
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    good, bad = json.loads(proc.stdout)
    assert "error" not in good and good["extra"] == [] and not marker.exists()
    assert "exit 2" in bad["error"] and "unrecognized arguments: --m 3" in bad["error"]
