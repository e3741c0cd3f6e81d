"""End to end: ``dealrec run`` and ``dealrec experiment`` on synthetic data with a tiny random
LLaMA, stage reuse on a re-run, the report's plots, and config errors."""

import json

import numpy as np
import pytest
import yaml

from jaxrec.cli import main as cli
from jaxrec.data import load_scores
from jaxrec.data.synthetic import make_synthetic
from tests.support import tiny_llama


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    data = make_synthetic(root / "data", n_users=80, n_items=40, n_clusters=4, max_len=8, seed=2)
    model = str(tiny_llama(root / "model"))
    llm = {"model": model, "device": "cpu", "dtype": "float32", "cutoff_len": 256}
    cfg = {
        "pipeline": {"workdir": str(root / "work"), "data": str(data)},
        "surrogate": {"epochs": 3, "batch_size": 32},
        "influence": {"steps": 50, "lissa_batch_size": 8},
        "effort": {**llm, "batch_size": 8},
        "select": {"n": 8, "groups": 4},
        "finetune": {**llm, "epochs": 1, "batch_size": 4, "grad_accum": 1},
        "evaluate": {**llm, "users": 5, "beams": 2, "max_new_tokens": 8},
    }
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path, cfg


def test_run_whole_pipeline_then_reuse(config, capsys):
    root, path, cfg = config
    assert cli(["run", str(path)]) == 0
    work = root / "work"
    metrics = json.loads((work / "metrics.json").read_text())
    assert "recall@10" in json.dumps(metrics)
    sel, manifest = load_scores(work / "selected.npy", kind="selection")
    assert len(np.unique(sel)) == 8 and manifest["method"] == "dealrec"
    for kind in ("influence", "effort"):
        scores, _ = load_scores(work / f"{kind}.npy", kind=kind)
        assert scores.shape == (80,) and np.isfinite(scores).all()
    capsys.readouterr()
    assert cli(["run", str(path)]) == 0  # everything is reused
    log = capsys.readouterr().err
    assert log.count("reusing") == 6
    assert cli(["report", str(work)]) == 0
    assert {p.name for p in (work / "report").iterdir()} >= {
        "scores_hist.png",
        "scores_scatter.png",
        "groups.png",
        "lissa_trace.png",
    }


def test_experiment_table_and_plot(config, tmp_path):
    root, _, cfg = config
    exp = dict(cfg, experiment={"methods": ["random", "dealrec"], "seeds": [0, 1]})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert cli(["experiment", str(path)]) == 0
    work = root / "work"
    table = (work / "results.md").read_text()
    assert "| random | 2 |" in table and "| dealrec | 2 |" in table and "t-test" in table
    assert (work / "results.png").stat().st_size > 1000
    assert len((work / "runs.csv").read_text().strip().splitlines()) == 5


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"surrogate": {"epochz": 3}}, "unknown key 'epochz'"),
        ({"selection": {}}, "unknown section 'selection'"),
        ({"pipeline": {"stages": ["train"]}}, "unknown stage 'train'"),
    ],
)
def test_bad_config_one_line_exit_2(tmp_path, capsys, bad, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"pipeline": {"workdir": str(tmp_path / "w")}, **bad}))
    assert cli(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_resumed_finetune_keeps_its_recorded_seconds(tmp_path):
    """A fine-tune resumed after a kill: its last invocation's wall time undercounts, the
    record's seconds (summed over invocations) count; a stage without a record keeps wall."""
    from jaxrec.pipeline import stage_seconds

    out = tmp_path / "model"
    out.mkdir()
    (out / "train_record.json").write_text(json.dumps({"seconds": 5640.2}))
    section = {"out": str(out)}
    assert stage_seconds("finetune", section, 3961.44) == 5640.2  # resumed: the record's total
    (out / "train_record.json").write_text(json.dumps({"seconds": 150.0}))
    assert stage_seconds("finetune", section, 170.33) == 170.3  # one invocation: wall time
    assert stage_seconds("evaluate", {"out": str(tmp_path / "m.json")}, 59.21) == 59.2
    (out / "metrics.json").write_text(json.dumps({"seconds_per_epoch": 70.0, "epochs_run": 40}))
    assert stage_seconds("surrogate", section, 900.0) == 2800.0  # resumed after 27 epochs


def test_option_marked_since_stays_out_of_the_key_at_its_default():
    """An option added after runs were archived (``since``) keys only when set off its
    default, so the archive's earlier runs keep their keys."""
    import dataclasses

    from jaxrec.config_io import option
    from jaxrec.pipeline import at_since_default

    @dataclasses.dataclass
    class C:
        old: int = option(1, "an option from the start")
        new: str = option("a", "added later", since="2026-12-07")

    fields = dataclasses.fields(C)
    assert at_since_default(fields, "new", "a")
    assert not at_since_default(fields, "new", "b")
    assert not at_since_default(fields, "old", 1)


def test_a_shared_stage_key_depends_only_on_the_stages_it_reads(tmp_path):
    """The semantic IDs keep their key whether the surrogate runs with them or not (a
    ``--stages semantic_ids`` run is reused by the full run); influence follows the surrogate;
    TIGER's effort follows the semantic IDs; the per-run chain still follows everything."""
    from jaxrec.pipeline import STAGES, stage_keys, wire

    def keys(stages, **sections):
        wired = wire(sections, tmp_path, "../shared/data/games", "tiger")
        return stage_keys(stages, wired)

    full = keys(list(STAGES))
    assert keys(["semantic_ids"])["semantic_ids"] == full["semantic_ids"]
    assert keys(["influence", "effort"])["effort"] == full["effort"]
    other = keys(list(STAGES), surrogate={"hidden": 32})
    assert other["semantic_ids"] == full["semantic_ids"]
    assert other["effort"] == full["effort"]
    assert other["influence"] != full["influence"]
    assert other["select"] != full["select"]
    ids = keys(list(STAGES), semantic_ids={"levels": 4})
    assert ids["effort"] != full["effort"] and ids["influence"] == full["influence"]
