"""End to end on the TIGER backend, tiny synthetic data: ``dealrec run`` with the semantic-ID
stage, and a ``dealrec experiment`` sweep (two points x two methods x two seeds) run in parts and
after an interruption: every cell is made once, finished cells are never redone. (Sweeps over
several keys, their names and ``--methods`` / ``--seeds`` parts are tested without a model in
tests/experiment/test_experiment.py; here one key keeps the sweep at 8 runs, not 16.)"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from jaxrec.cli import main as cli
from jaxrec.data.synthetic import make_synthetic
from tests.support import ROOT, TIGER_EVALUATE, TIGER_FINETUNE

pytest.importorskip("llm_bridge.tiger.effort")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiger")
    data = make_synthetic(root / "data", n_users=120, n_items=40, n_clusters=4, max_len=8, seed=3)
    cfg = {
        "pipeline": {"workdir": str(root / "work"), "data": str(data), "backend": "tiger"},
        "surrogate": {"epochs": 2, "batch_size": 32},
        "influence": {"steps": 40, "lissa_batch_size": 8},
        "semantic_ids": {"method": "rkmeans", "codebook_size": 4, "cache_dir": str(root / "cache")},
        "effort": {"batch_size": 32, "device": "cpu"},
        "select": {"n": 16, "groups": 4},
        "finetune": dict(TIGER_FINETUNE),
        "evaluate": dict(TIGER_EVALUATE),  # 16 users: the sweep below makes 16 runs
    }
    return root, cfg


def _write(root, cfg, name):
    path = root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def test_run_tiger_pipeline(config):
    root, cfg = config
    assert cli(["run", _write(root, cfg, "run.yaml")]) == 0
    work = root / "work"
    metrics = json.loads((work / "metrics.json").read_text())
    assert 0.0 <= metrics["recall@20"] <= 1.0 and metrics["n_users"] > 0
    state = json.loads((work / "stages.json").read_text())
    assert list(state) == [
        "surrogate",
        "influence",
        "semantic_ids",
        "effort",
        "select",
        "finetune",
        "evaluate",
    ]


def test_sweep_in_parts_and_after_interruption(config, capsys):
    root, cfg = config
    exp = dict(
        cfg,
        experiment={
            "methods": ["random", "dealrec"],
            "seeds": [0, 1],
            "sweep": {"select.n": [8, 16]},
        },
    )
    path = _write(root, exp, "sweep.yaml")
    assert cli(["experiment", path, "--methods", "random", "--seeds", "0"]) == 0  # a part
    runs = root / "work" / "runs"
    first = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("random-seed0*/metrics.json")}
    assert len(first) == 2 and "random-seed0" in first  # n=16: the config's own
    # an interrupted cell: its evaluation never finished
    victim = runs / "dealrec-seed1-select.n=8"
    assert cli(["experiment", path, "--methods", "dealrec", "--seeds", "1"]) == 0
    (victim / "metrics.json").unlink()
    capsys.readouterr()
    assert cli(["experiment", path]) == 0
    log = capsys.readouterr().err
    cells = sorted(p.parent.name for p in runs.glob("*/metrics.json"))
    assert len(cells) == 8 and len(set(cells)) == 8
    assert {
        p.parent.name: p.stat().st_mtime_ns  # never redone
        for p in runs.glob("random-seed0*/metrics.json")
    } == first
    assert log.count(f"run {victim.name}") == 1
    # said before any stage starts: what is done, what will run, a rough time from the 3 runs
    # finished so far (random seed 0 at 2 points, dealrec seed 1 at 1: the victim was undone)
    assert re.search(
        r"8 runs asked for: 0 archived, 3 finished in the workdir, 5 to run, about "
        r"(\d+ h )?\d+ min in one process \(the mean seconds of 3 timed runs\)",
        log,
    )
    assert log.index("5 to run") < log.index("[1/")
    assert "[3/3] evaluate: dealrec evaluate" in log
    results = (root / "work" / "results.csv").read_text().splitlines()
    assert results[0].startswith("select.n,method,runs")
    assert len(results) == 1 + 4  # 2 points x 2 methods


def test_archived_runs_are_not_rerun_once_the_runs_are_gone(config, capsys):
    root, cfg = config
    exp = dict(
        cfg,
        experiment={
            "methods": ["random", "dealrec"],
            "seeds": [0],
            "sweep": {"select.n": [8, 16]},
            "user_groups": 3,
            "archive": str(root / "archive"),
        },
    )
    path = _write(root, exp, "archived.yaml")
    assert cli(["experiment", path]) == 0  # 4 runs of the sweep above (reused), archived
    work, tables = root / "work", ("results.csv", "ttest.csv", "usertest.csv", "groups.csv")
    before = {name: (work / name).read_text() for name in tables}
    with open(root / "archive" / "runs.csv", newline="") as f:
        archived = list(csv.DictReader(f))
    assert len(archived) == 4
    # each run keeps its fine-tune's epochs and best epoch, as its train_record.json has them
    records = [json.loads(p.read_text()) for p in work.rglob("train_record.json")]
    kept = {(len(r["epochs"]), r["best_epoch"]) for r in records}
    for r in archived:
        epochs, best = int(r["finetune_epochs"]), int(r["finetune_best_epoch"])
        assert 1 <= best <= epochs and (epochs, best) in kept
    shutil.rmtree(work)  # a new machine: the workdir is gone, shared stages included
    capsys.readouterr()
    assert cli(["experiment", path]) == 0
    log = capsys.readouterr().err
    assert log.count("not rerun") == 4 and "shared stages are not needed" in log
    assert "dealrec select" not in log and "dealrec train-surrogate" not in log
    assert not (work / "runs").exists()
    assert {name: (work / name).read_text() for name in tables} == before


def test_a_second_workdir_finds_the_archived_runs_and_starts_no_stage(config, capsys):
    """A fresh clone: ``--workdir ANY`` (here an empty folder) rebuilds the tables from the
    archive alone, computing nothing (reuse keys do not depend on the workdir)."""
    root, _ = config
    other = root / "elsewhere"
    capsys.readouterr()
    assert cli(["experiment", str(root / "archived.yaml"), "--workdir", str(other)]) == 0
    log = capsys.readouterr().err
    assert "4 runs asked for: 4 archived, 0 finished in the workdir, 0 to run" in log
    assert "(nothing to compute)" in log and log.count("not rerun") == 4
    assert not re.search(r"\[\d+/\d+\] \w+: dealrec ", log)  # no stage command started
    assert not (other / "runs").exists()
    for name in ("results.csv", "ttest.csv", "usertest.csv", "groups.csv"):
        assert (other / name).read_text() == (root / "work" / name).read_text()
    # --plan: what would run and about how long (from the 4 archived runs' seconds), no more
    exp = yaml.safe_load((root / "archived.yaml").read_text())
    exp["experiment"]["seeds"] = [0, 9]
    path = _write(root, exp, "plan.yaml")
    assert cli(["experiment", path, "--workdir", str(root / "planned"), "--plan"]) == 0
    log = capsys.readouterr().err
    assert "8 runs asked for: 4 archived, 0 finished in the workdir, 4 to run, about " in log
    assert "(the mean seconds of 4 timed runs)" in log
    assert not re.search(r"\[\d+/\d+\] \w+: dealrec ", log)
    assert not (root / "planned" / "runs").exists()
    assert not (root / "planned" / "results.csv").exists()


def test_two_processes_take_the_runs_of_one_experiment(config):
    """Two ``dealrec experiment`` processes on one workdir (issue 28): every run is made by
    exactly one of them (a run lock per run), both finish, no lock is left behind."""
    root, cfg = config
    path = _write(
        root, dict(cfg, experiment={"methods": ["random"], "seeds": [5, 6, 7]}), "two.yaml"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "jaxrec.cli", "experiment", path]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    logs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    runs = root / "work" / "runs"
    for seed in (5, 6, 7):
        name = f"random-seed{seed}"
        made = [len(re.findall(rf"\] run {name}$", log, re.M)) for log in logs]
        assert sum(made) == 1, (name, made)
        assert (runs / name / "metrics.json").is_file()
        assert not (runs / name / "run.lock").exists()
    assert not (root / "work" / "shared.lock").exists()


def test_effort_history_must_match_finetune(config, capsys):
    root, cfg = config
    bad = dict(cfg, effort={**cfg["effort"], "max_history": 5})
    bad["pipeline"] = {**cfg["pipeline"], "workdir": str(root / "bad")}
    assert cli(["run", _write(root, bad, "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "effort.max_history (5) must equal finetune.max_history (20)" in err[-1]
    assert not (root / "bad" / "stages.json").exists()  # no stage ran
