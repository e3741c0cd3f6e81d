"""Every config shipped in configs/ parses: known sections, known keys, right types, known
methods."""

from pathlib import Path

import pytest

from jaxrec.config import make_config
from jaxrec.errors import UserError
from jaxrec.experiment import ExperimentConfig
from jaxrec.pipeline import read_experiment_file
from jaxrec.select import check_method

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "demo.yaml",
        "games.yaml",
        "table2_smoke.yaml",
        "table2_gpu.yaml",
        "tiger_demo.yaml",
        "table2_tiger.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    data = read_experiment_file(path, extra_sections=("experiment", "lds"))
    if "lds" in data:  # dealrec lds reads its own section
        from jaxrec.config import LdsConfig

        make_config(LdsConfig, data["lds"], str(path))
    if "experiment" in data:
        exp = make_config(ExperimentConfig, data["experiment"], str(path))
        assert exp.methods and exp.seeds
        for method in exp.methods:
            check_method(method)


def test_experiment_rejects_unknown_method_before_running(tmp_path):
    from jaxrec.experiment import ExperimentArgs, main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"pipeline:\n  workdir: {tmp_path / 'w'}\n  data: {tmp_path / 'nodata'}\n"
        "experiment:\n  methods: [random, best]\n  seeds: [0]\n"
    )
    with pytest.raises(UserError, match="unknown method 'best'"):
        main(ExperimentArgs(config=str(cfg)))
    assert not (tmp_path / "w").exists()
