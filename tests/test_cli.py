"""The ``dealrec`` command line: config files are read strictly (no section or key is silently
ignored), the positional ``CONFIG`` form, one-line errors that name flags. (The command lines
that README.md and docs/*.md show: tests/test_documented_commands.py.)"""

import pytest

from jaxrec.cli import build_parser, main


def _error(capsys, argv) -> str:
    """The one-line error of ``dealrec ARGV`` (exit 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- config sections
def test_a_misspelt_section_is_an_error_with_the_right_name(tmp_path, capsys):
    cfg = tmp_path / "f.yaml"
    cfg.write_text("semantic_id:\n  levels: 2\n")
    out = tmp_path / "codes.npy"
    err = _error(capsys, ["semantic-ids", "--config", str(cfg), "--out", str(out)])
    assert "unknown section 'semantic_id'" in err and "did you mean 'semantic_ids'" in err
    assert not out.exists()


def test_a_file_without_the_commands_section_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "f.yaml"
    cfg.write_text("surrogate:\n  epochs: 2\n")
    err = _error(capsys, ["lds", str(cfg), "--out", str(tmp_path / "lds")])
    assert "no 'lds' section" in err and "sections: surrogate" in err
    assert not (tmp_path / "lds").exists()


def test_an_unknown_key_in_any_section_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "f.yaml"
    cfg.write_text("lds:\n  epochs: 2\nfinetune:\n  learning_rate: 0.1\n")
    err = _error(capsys, ["lds", str(cfg), "--out", str(tmp_path / "lds")])
    assert "[finetune]: unknown key 'learning_rate'" in err
    cfg.write_text("lds:\n  epochz: 2\n")
    assert "[lds]: unknown key 'epochz'" in _error(capsys, ["lds", "--config", str(cfg)])


def test_a_pipeline_file_and_its_score_stages_are_accepted(tmp_path):
    """``dealrec run`` hands every stage its resolved.yaml: all sections, plus score stages
    named ``influence:KIND``."""
    from jaxrec.cli import section_classes
    from jaxrec.config import SelectConfig
    from jaxrec.config_io import check_sections, load_config_file

    cfg = tmp_path / "f.yaml"
    cfg.write_text(
        "pipeline:\n  workdir: w\nselect:\n  n: 3\ninfluence:\n  damping: 0.1\n"
        "influence:grand:\n  score: grand\nexperiment:\n  seeds: [0]\n"
    )
    check_sections(load_config_file(cfg), str(cfg), "select", section_classes())
    SelectConfig(n=3)


def test_positional_config_and_flags(tmp_path):
    from jaxrec.config import LdsConfig
    from jaxrec.config_io import config_from_args

    cfg = tmp_path / "f.yaml"
    cfg.write_text("lds:\n  subsets: 7\n  seeds: 3\n")
    args = build_parser().parse_args(["lds", str(cfg), "--seeds", "4"])
    got = config_from_args(LdsConfig, args, "lds")
    assert (got.subsets, got.seeds) == (7, 4)
    args = build_parser().parse_args(["lds", str(cfg), "--config", str(tmp_path / "g.yaml")])
    with pytest.raises(Exception, match="two config files"):
        config_from_args(LdsConfig, args, "lds")


def test_errors_name_flags_as_spelled(tmp_path, capsys):
    from jaxrec.config import SelectConfig
    from jaxrec.config_io import flag_words

    assert flag_words("increase damping= or use out='a b'", SelectConfig) == (
        "increase damping= or use --out a b"
    )
    assert (
        flag_words("hard_prune=2 and select.n=5", SelectConfig) == "--hard-prune 2 and select.n=5"
    )
    err = _error(capsys, ["select", "--n", "-5", "--out", str(tmp_path / "s.npy")])
    assert "--n" in err and "n=" not in err.replace("--n", "")


def test_help_has_no_rst_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "``" not in shown and "dealrec doctor" in shown


def test_run_refuses_a_bad_select_value_before_any_stage(tmp_path, capsys):
    """``select.n: -5`` in a pipeline file: exit 2 before the workdir (and its data slice)
    exists."""
    cfg = tmp_path / "p.yaml"
    work = tmp_path / "w"
    cfg.write_text(f"pipeline:\n  workdir: {work}\n  users: 50\nselect:\n  n: -5\n")
    err = _error(capsys, ["run", str(cfg)])
    assert "[select]: n=-5: must be >= 1" in err
    assert not work.exists()


def test_tiger_evaluate_with_fewer_beams_than_k_is_refused_at_once(tmp_path, capsys):
    err = _error(capsys, ["evaluate", "--backend", "tiger", "--beams", "5", "--out", "m.json"])
    assert "--beams 5: TIGER needs at least 20 beams" in err


def test_a_codebook_larger_than_the_items_is_refused(tmp_path, capsys):
    from jaxrec.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", n_users=30, n_items=20, seed=0)
    out = tmp_path / "codes.npy"
    argv = ["semantic-ids", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path)]
    err = _error(capsys, [*argv, "--codebook-size", "64"])
    assert "--codebook-size 64 is larger than the 20 items" in err
    assert "--codebook-size 1: must be >= 2" in _error(capsys, [*argv, "--codebook-size", "1"])
    assert not out.exists()


def test_report_on_a_folder_with_nothing_to_plot_writes_nothing(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    err = _error(capsys, ["report", str(tmp_path / "run")])
    assert "nothing to plot" in err and "experiment folder" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]
    assert "run folder not found" in _error(capsys, ["report", str(tmp_path / "nope")])
    assert not (tmp_path / "nope").exists()
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "experiment folder" in capsys.readouterr().out


def test_resume_is_the_default_and_keyed_as_archived():
    """Every resumable command resumes by default; ``resume`` and the cache folders do not
    change results, so reuse keys hold the value archived keys were made with
    (``keyed_value``; the pipeline's key_options applies it)."""
    from jaxrec.config import SurrogateConfig
    from jaxrec.config_io import keyed_value
    from llm_bridge.config import (
        EffortConfig,
        EvaluateConfig,
        FinetuneConfig,
        SemanticIdConfig,
        UserRepsConfig,
    )

    archived = {
        (SurrogateConfig, "resume"): True,
        (EffortConfig, "resume"): False,
        (UserRepsConfig, "resume"): False,
        (FinetuneConfig, "resume"): True,
        (SemanticIdConfig, "cache_dir"): "runs/cache",
        (EvaluateConfig, "cache_dir"): "runs/cache",
    }
    for (cls, name), value in archived.items():
        f = cls.__dataclass_fields__[name]
        assert keyed_value(f, "elsewhere") == value, (cls.__name__, name)
        if name == "resume":
            assert f.default is True, cls.__name__
    assert keyed_value(SurrogateConfig.__dataclass_fields__["lr"], 0.5) == 0.5
