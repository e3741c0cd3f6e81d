"""Two studies in one workdir never share a run folder (issue 25): a study whose options differ
in a key not in the folder's name (here ``finetune.valid_users``) runs in its spare folder
``runs/NAME~KEY8`` and leaves the first study's run untouched; a resume finds it again. The
folder rules by hand first (no model), then end to end on the TIGER backend, tiny synthetic
data, the ``random`` method (no surrogate)."""

import csv
import json
import os
import re

import pytest
import yaml

from jaxrec.cli import main as cli
from jaxrec.data.synthetic import make_synthetic
from jaxrec.experiment import locks, place_run, spare_folder
from jaxrec.experiment.folders import claim_folder, holds_other_run
from tests.support import TIGER_EVALUATE, TIGER_FINETUNE

KEYS = {"select": "s1", "finetune": "f1", "evaluate": "e1abcdef99"}


def _state(folder, state):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stages.json").write_text(json.dumps(state))


def test_which_run_a_folder_holds(tmp_path):
    usual = tmp_path / "runs" / "random-seed2"
    spare = tmp_path / "runs" / "random-seed2~e1abcdef"
    assert spare_folder(usual, KEYS["evaluate"]) == spare == spare_folder(spare, "e1abcdef99")
    assert place_run(usual, KEYS) == usual  # new
    # a folder from before run keys were recorded: its stage keys say whose it is
    _state(usual, {"select": {"key": "s1"}})  # this run's select (identical), nothing else yet
    assert not holds_other_run(usual, KEYS) and place_run(usual, KEYS) == usual
    _state(usual, {"select": {"key": "s1"}, "finetune": {"key": "f0"}})  # another fine-tune
    assert holds_other_run(usual, KEYS) and place_run(usual, KEYS) == spare
    # the recorded run key decides, even before any stage finished
    _state(usual, {})
    claim_folder(usual, "e0other")
    assert holds_other_run(usual, KEYS)
    _state(usual, {"select": {"key": "s1"}})
    claim_folder(usual, KEYS["evaluate"])
    state = json.loads((usual / "stages.json").read_text())
    assert state == {"run": {"key": "e1abcdef99"}, "select": {"key": "s1"}}
    assert place_run(usual, KEYS) == usual
    # a live process of another run holds the folder's lock (this process: alive)
    assert locks.acquire(usual / "run.lock", {"run": "e0other"})
    try:
        assert holds_other_run(usual, KEYS) and place_run(usual, KEYS) == spare
    finally:
        locks.release(usual / "run.lock")
    assert place_run(usual, KEYS) == usual
    spare.mkdir()  # the run ran in its spare folder before: found first
    assert place_run(usual, KEYS) == spare


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two one-run studies (random, seed 0) of one workdir differing in one fine-tune option."""
    root = tmp_path_factory.mktemp("folders")
    data = make_synthetic(root / "data", n_users=120, n_items=40, n_clusters=4, max_len=8, seed=3)
    cfg = {
        "pipeline": {"workdir": str(root / "work"), "data": str(data), "backend": "tiger"},
        "semantic_ids": {"method": "rkmeans", "codebook_size": 4, "cache_dir": str(root / "c")},
        "select": {"n": 16},
        "finetune": dict(TIGER_FINETUNE),
        "evaluate": dict(TIGER_EVALUATE),
    }
    paths = []
    for name, finetune in (("a", {}), ("b", {"valid_users": "fixed", "valid_fixed_n": 16})):
        exp = dict(cfg, experiment={"name": name, "methods": ["random"], "seeds": [0]})
        exp["finetune"] = {**cfg["finetune"], **finetune}
        paths.append(root / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(exp, sort_keys=False))
    return root / "work", [str(p) for p in paths]


def _snapshot(folder):
    """Every file of ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _row(work, study):
    with open(work / "studies" / study / "runs.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    return row


def _check_row(row, folder):
    state = json.loads((folder / "stages.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert row["key"] == state["run"]["key"] == state["evaluate"]["key"]
    assert float(row["recall@20"]) == pytest.approx(metrics["recall@20"])
    assert os.path.dirname(row["predictions"]) == str(folder)


def test_two_studies_in_one_workdir_keep_their_runs(studies, capsys):
    work, (first, second) = studies
    assert cli(["experiment", first]) == 0
    usual = work / "runs" / "random-seed0"
    before = _snapshot(usual)
    assert {"selected.npy", "metrics.json", "stages.json"} <= set(before)
    capsys.readouterr()
    assert cli(["experiment", second, "--plan"]) == 0
    log = capsys.readouterr().err
    moved = re.search(r"random-seed0 in runs/(random-seed0~[0-9a-f]{8})", log)
    assert moved and "1 runs asked for: 0 archived, 0 finished in the workdir, 1 to run" in log
    spare = work / "runs" / moved.group(1)
    assert not spare.exists()  # a plan makes nothing
    assert cli(["experiment", second]) == 0
    log = capsys.readouterr().err
    assert f"run random-seed0 (in {spare.name})" in log
    assert _snapshot(usual) == before  # the first study's run is untouched
    assert sorted(p.name for p in (work / "runs").iterdir()) == [usual.name, spare.name]
    _check_row(_row(work, "a"), usual)
    _check_row(_row(work, "b"), spare)
    assert _row(work, "a")["key"] != _row(work, "b")["key"]
    # each study again: its own folder, finished, nothing rerun
    for path, folder in ((second, spare), (first, usual)):
        after = _snapshot(folder)
        assert cli(["experiment", path]) == 0
        log = capsys.readouterr().err
        assert "0 archived, 1 finished in the workdir, 0 to run" in log
        assert "run random-seed0" not in log and "dealrec finetune" not in log
        assert _snapshot(folder) == after
    assert _snapshot(usual) == before
