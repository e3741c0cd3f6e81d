"""Every config shipped in configs/ parses: known sections, known keys, right types, known
methods."""

import dataclasses
from pathlib import Path

import pytest

from jaxrec.cli import COMMANDS
from jaxrec.config_io import make_config
from jaxrec.errors import UserError
from jaxrec.experiment import ExperimentConfig
from jaxrec.pipeline import read_experiment_file
from jaxrec.select import check_method
from tests.support import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


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
    data = read_experiment_file(path, extra_sections=("experiment", "lds", "lds_leaderboard"))
    if "lds" in data:  # dealrec lds reads its own section
        from jaxrec.config import LdsConfig

        make_config(LdsConfig, data["lds"], str(path))
    if "experiment" in data:
        from jaxrec.experiment import ExperimentArgs, read_experiment

        exp = make_config(ExperimentConfig, data["experiment"], str(path))
        assert exp.methods and exp.seeds
        for method in exp.methods:
            check_method(method)
        read_experiment(ExperimentArgs(config=str(path)))  # every check `dealrec experiment` makes


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


# ----------------------------------------------------------------------------- paper protocol
CONFIG_DIR = ROOT / "configs"
BIGREC_STUDIES = sorted((CONFIG_DIR / "studies").glob("*_bigrec.yaml"))


def _resolved(path):
    """The effort and finetune options a pipeline run of ``path`` hands to its stages."""
    from jaxrec.pipeline import wire
    from llm_bridge.config import EffortConfig, FinetuneConfig

    data = read_experiment_file(path, extra_sections=("experiment",))
    wired = wire(data, Path("/tmp/w"), "data", data["pipeline"].backend)
    return (
        make_config(EffortConfig, wired["effort"], f"{path} [effort]"),
        make_config(FinetuneConfig, wired["finetune"], f"{path} [finetune]"),
    )


@pytest.mark.parametrize("name", ["games.yaml", "table2_gpu.yaml"])
def test_paper_protocol_configs_use_the_official_llm_choices(name):
    """The official code: every-token per-sample-mean loss for fine-tune and effort
    (--train_on_inputs, labels = input_ids) and effort on the last layer's v_proj lora_B."""
    effort, finetune = _resolved(CONFIG_DIR / name)
    assert effort.backend == finetune.backend == "bigrec"
    assert effort.loss == "sequence-mean" and finetune.loss == "sequence-mean"
    assert effort.scope == "official" and effort.params == ""


@pytest.mark.parametrize("study", BIGREC_STUDIES, ids=lambda p: p.name)
def test_bigrec_studies_on_the_gpu_base_get_the_official_choices(study, tmp_path):
    """The studies run at smoke scale on table2_smoke.yaml (the project's defaults); rebased on
    table2_gpu.yaml (paper scale, as their headers say) they get the official choices."""
    import yaml

    assert yaml.safe_load(study.read_text())["base"] == "../table2_smoke.yaml"
    rebased = tmp_path / study.name
    text = study.read_text().replace("../table2_smoke.yaml", str(CONFIG_DIR / "table2_gpu.yaml"))
    rebased.write_text(text)
    effort, finetune = _resolved(rebased)
    assert (effort.loss, effort.scope, finetune.loss) == (
        "sequence-mean",
        "official",
        "sequence-mean",
    )


# ----------------------------------------------------------------------------- --help
@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_every_option_has_help_text_that_help_shows(cmd, capsys):
    """Every field of a subcommand's config dataclass has a help text, and ``dealrec CMD
    --help`` shows it (compared without whitespace: argparse wraps lines, also at hyphens)."""
    from jaxrec.cli import _load, main

    cls = _load(COMMANDS[cmd][0])
    if not dataclasses.is_dataclass(cls):
        pytest.skip(f"{cls.__name__} is not a dataclass")
    fields = dataclasses.fields(cls)
    assert [f.name for f in fields if not f.metadata.get("help", "").strip()] == []
    with pytest.raises(SystemExit) as exited:
        main([cmd, "--help"])
    assert exited.value.code == 0
    shown = "".join(capsys.readouterr().out.split())
    own = {f.name for f in fields}
    for f in fields:
        if "nested" in f.metadata:  # an options object: its flags under its flat names
            inner = dataclasses.fields(f.default_factory())
            # a tied flat name is the config's own field; a shared one, an earlier group's
            flagged = {
                g.name: g
                for g in inner
                if g.name in f.metadata["nested"] and f.metadata["nested"][g.name][0] not in own
            }
            own |= {nm[0] for nm in f.metadata["nested"].values()}
            for name, g in flagged.items():
                flag = f.metadata["nested"][name][0]
                assert "--" + flag.replace("_", "-") in shown, (cmd, f.name, name)
                assert "".join(g.metadata["help"].split()) in shown, (cmd, f.name, name)
            if flagged:
                assert "".join(f.metadata["help"].split()) in shown, (cmd, f.name)
            continue
        assert "".join(f.metadata["help"].split()) in shown, (cmd, f.name)
        if not hasattr(cls, "add_arguments"):  # one --flag per field
            assert "--" + f.name.replace("_", "-") in shown, (cmd, f.name)


# the influence stage's reuse key (shared_key) and its options' digest, computed at main 96b372a
# before the solver options became nested objects: archived score files stay reused
INFLUENCE_KEYS = {
    "demo.yaml": ("25a1622b3e80720e", "489927816bce4a08"),
    "games.yaml": ("2fb77405b6d44a61", "e8c9d3b5701d5fa6"),
    "studies/seeds30_tiger.yaml": ("7982939fcd616d6e", "677ae20d5502b1fd"),
    "studies/ablation_bigrec.yaml": ("ef0a4266099ccff4", "721a5b5ace1881a6"),
    "table4/tiger_bert4rec.yaml": ("43cbbc5fe20412a7", "1467fe61e2fbfe2a"),
    "table4/tiger_dcrec.yaml": ("16c803647bb2a24f", "d4e1629b88048320"),
}


@pytest.mark.parametrize("name", sorted(INFLUENCE_KEYS))
def test_influence_reuse_keys_of_shipped_configs_are_unchanged(name):
    from jaxrec.pipeline import digest, key_options, shared_key, wire

    data = read_experiment_file(ROOT / "configs" / name, extra_sections=("experiment",))
    pipe = data["pipeline"]
    wired = wire(data, Path("/anywhere"), pipe.data, pipe.backend)
    got = (shared_key("influence", wired), digest(key_options("influence", wired["influence"])))
    assert got == INFLUENCE_KEYS[name]


def test_influence_reuse_key_of_set_solver_options_is_unchanged():
    """Solver options set by their flat names (an int for a float included) key as before."""
    from jaxrec.pipeline import digest, key_options

    section = {"solver": "cg", "steps": 100, "tol": 1e-4, "batch_size": 32, "seed": 3}
    section.update(exact_chunk=64, lissa_batch_size=8, rank=7, damping=1)
    assert digest(key_options("influence", section)) == "b7721e7b2742edf5"


def test_nested_solver_options_read_and_key_as_their_flat_names():
    """An influence section may give each solver's options as a mapping (the typed objects of
    the Python API) or by their flat names: the same config, the same reuse key; a tied option
    (the config's own batch_size / seed) set differently in a mapping is an error."""
    from jaxrec.config import CGOptions, InfluenceConfig, LissaOptions
    from jaxrec.pipeline import digest, key_options

    flat = {"solver": "cg", "steps": 100, "tol": 1e-4, "batch_size": 32, "seed": 3}
    flat.update(exact_chunk=64, lissa_batch_size=8, rank=7, damping=1)
    nested = {"solver": "cg", "batch_size": 32, "seed": 3, "damping": 1}
    nested.update(lissa={"steps": 100, "batch_size": 8}, cg={"tol": 1e-4})
    nested.update(exact={"chunk": 64}, arnoldi={"rank": 7})
    a, b = make_config(InfluenceConfig, flat), make_config(InfluenceConfig, nested)
    assert a == b and a.lissa == LissaOptions(steps=100, batch_size=8, seed=3)
    assert a.cg == CGOptions(tol=1e-4, batch_size=32) and a.arnoldi.seed == 3
    assert digest(key_options("influence", nested)) == "b7721e7b2742edf5"
    with pytest.raises(UserError, match="cg.batch_size is batch_size here"):
        make_config(InfluenceConfig, {"cg": {"batch_size": 8}})
    with pytest.raises(UserError, match="name one option"):
        make_config(InfluenceConfig, {"steps": 5, "lissa": {"steps": 6}})
    with pytest.raises(UserError, match="unknown key 'stepz'"):
        make_config(InfluenceConfig, {"lissa": {"stepz": 6}})
