"""``dealrec select`` end to end on a synthetic dataset: outputs, manifests, and bad input."""

import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.config import InfluenceConfig, SurrogateConfig
from jaxrec.data import load_dataset, load_scores, save_scores
from jaxrec.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    data = make_synthetic(root / "data", n_users=300, seed=0)
    other = make_synthetic(root / "other", n_users=300, seed=1)  # same size, other users
    ds, ods = load_dataset(data), load_dataset(other)
    rng = np.random.default_rng(0)
    fp = ds.fingerprint()
    paths = {
        "influence": save_scores(
            root / "influence.npy", rng.standard_normal(300), kind="influence", dataset=fp
        ),
        "effort": save_scores(root / "effort.npy", rng.random(300), kind="effort", dataset=fp),
        "foreign": save_scores(
            root / "foreign.npy",
            rng.standard_normal(300),
            kind="influence",
            dataset=ods.fingerprint(),
        ),
        "short": save_scores(
            root / "short.npy",
            rng.standard_normal(299),
            kind="influence",
            dataset={"train_sha256": ds.train_sha256, "n_users": 299},
        ),
    }
    run = root / "run"
    save_scores(run / "grand.npy", rng.random(300), kind="grand", dataset=fp)
    save_scores(run / "el2n.npy", rng.random(300), kind="el2n", dataset=fp)
    save_scores(
        run / "user_representations.npy",
        rng.standard_normal((300, 16)),
        kind="representation",
        dataset=fp,
    )
    return {"root": root, "data": str(data), "ds": ds, "run": str(run), **paths}


def _args(w, out, *extra):
    return ["select", "--data", w["data"], "--out", str(out), *map(str, extra)]


def test_dealrec_writes_selection_and_manifest(world, tmp_path):
    out = tmp_path / "selected.npy"
    rc = main(
        _args(
            world,
            out,
            "--method",
            "dealrec",
            "--influence",
            world["influence"],
            "--effort",
            world["effort"],
            "--n",
            40,
            "--lamda",
            0.3,
            "--groups",
            10,
            "--hard-prune",
            0.1,
            "--seed",
            0,
        )
    )
    assert rc == 0
    sel, manifest = load_scores(out, kind="selection", dataset=world["ds"].fingerprint())
    assert sel.dtype == np.int64 and sel.size == 40 and np.unique(sel).size == 40
    assert manifest["method"] == "dealrec" and manifest["seed"] == 0
    assert manifest["options"]["lamda"] == 0.3 and manifest["options"]["groups"] == 10
    assert sum(manifest["selection"]["group_selected"]) == 40
    assert len(manifest["selection"]["group_sizes"]) == 10
    assert manifest["inputs"]["influence"]["dataset"]["train_sha256"] == world["ds"].train_sha256
    assert len(manifest["inputs"]["effort"]["sha256"]) == 64
    # the CLI result is the Python API's result
    from jaxrec.select import select

    infl, _ = load_scores(world["influence"])
    eff, _ = load_scores(world["effort"])
    api = select(
        "dealrec", 40, influence=infl, effort=eff, lamda=0.3, groups=10, hard_prune=0.1, seed=0
    )
    np.testing.assert_array_equal(sel, api.indices)
    # same seed -> same file content
    out2 = tmp_path / "again.npy"
    main(
        _args(
            world,
            out2,
            "--influence",
            world["influence"],
            "--effort",
            world["effort"],
            "--n",
            40,
            "--lamda",
            0.3,
            "--groups",
            10,
        )
    )
    np.testing.assert_array_equal(np.load(out2), sel)


@pytest.mark.parametrize(
    "method",
    [
        "random",
        "grand",
        "el2n",
        "ccs",
        "tfdcon",
        "recranker",
        "greedy",
        "influence-only",
        "effort-only",
    ],
)
def test_every_baseline_through_the_cli(world, tmp_path, method):
    out = tmp_path / f"{method}.npy"
    rc = main(
        _args(
            world,
            out,
            "--method",
            method,
            "--run",
            world["run"],
            "--influence",
            world["influence"],
            "--effort",
            world["effort"],
            "--n",
            25,
            "--groups",
            8,
            "--clusters",
            5,
            "--beta-rule",
            "fixed",
            "--beta",
            0.2,
        )
    )
    assert rc == 0
    sel, manifest = load_scores(out, kind="selection")
    assert sel.size == 25 and np.unique(sel).size == 25 and manifest["method"] == method
    if method in ("grand", "el2n"):
        scores, _ = load_scores(f"{world['run']}/{method}.npy")
        np.testing.assert_array_equal(sel, np.sort(np.argsort(-scores, kind="stable")[:25]))
        assert manifest["inputs"][method]["path"].endswith(f"{method}.npy")


def test_tfdcon_with_llm_representations(world, tmp_path):
    llm = save_scores(
        tmp_path / "llm.npy",
        np.random.default_rng(1).standard_normal((300, 6)),
        kind="llm_representation",
        dataset=world["ds"].fingerprint(),
    )
    out = tmp_path / "t.npy"
    assert (
        main(
            _args(
                world,
                out,
                "--method",
                "tfdcon",
                "--run",
                world["run"],
                "--llm-reps",
                llm,
                "--n",
                30,
                "--clusters",
                4,
            )
        )
        == 0
    )
    _, manifest = load_scores(out)
    assert "llm_representations" in manifest["inputs"]


BAD = {
    "foreign fingerprint": ["--influence", "{foreign}", "--effort", "{effort}"],
    "wrong length": ["--influence", "{short}", "--effort", "{effort}"],
    "wrong kind": ["--influence", "{effort}", "--effort", "{effort}"],
    "missing file": ["--influence", "{root}/nope.npy", "--effort", "{effort}"],
    "missing flag": ["--influence", "{influence}"],
    "n too large": ["--influence", "{influence}", "--effort", "{effort}", "--n", "301"],
    "n zero": ["--influence", "{influence}", "--effort", "{effort}", "--n", "0"],
    "n negative": ["--influence", "{influence}", "--effort", "{effort}", "--n", "-3"],
    "groups zero": ["--influence", "{influence}", "--effort", "{effort}", "--groups", "0"],
    "negative lamda": ["--influence", "{influence}", "--effort", "{effort}", "--lamda", "-1"],
    "prune everything": [
        "--influence",
        "{influence}",
        "--effort",
        "{effort}",
        "--hard-prune",
        "0.95",
    ],
    "unknown method": ["--method", "best", "--influence", "{influence}"],
    "no run": ["--method", "grand"],
    "foreign scores": ["--method", "el2n", "--scores", "{foreign}"],
    "beta without fixed rule": ["--method", "ccs", "--scores", "{effort}", "--beta", "0.3"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_without_output(world, tmp_path, capsys, case):
    out = tmp_path / "selected.npy"
    extra = [
        a.format(**{k: world[k] for k in ("root", "foreign", "short", "effort", "influence")})
        for a in BAD[case]
    ]
    if "--n" not in extra:
        extra += ["--n", "20"]
    assert main(_args(world, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dealrec select: error:") and "\n" not in err
    assert not any(tmp_path.iterdir())


def test_stale_or_missing_surrogate_scores_are_errors(world, tmp_path, capsys):
    """A RUN/grand.npy made from another dataset is never used, and a missing one is an error
    that names the `dealrec influence` command to run: select computes nothing."""
    run = tmp_path / "run"
    ods = load_dataset(world["root"] / "other")
    save_scores(run / "grand.npy", np.arange(300.0), kind="grand", dataset=ods.fingerprint())
    out = tmp_path / "sel.npy"
    assert main(_args(world, out, "--method", "grand", "--run", run, "--n", 5)) == 2
    assert "another dataset" in capsys.readouterr().err and not out.exists()
    assert main(_args(world, out, "--method", "el2n", "--run", run, "--n", 5)) == 2
    err = capsys.readouterr().err
    assert f"dealrec influence --score el2n --run {run} --out {run / 'el2n.npy'}" in err
    fresh = np.random.default_rng(9).random(300)
    save_scores(run / "grand.npy", fresh, kind="grand", dataset=world["ds"].fingerprint())
    assert main(_args(world, out, "--method", "grand", "--run", run, "--n", 5)) == 0
    np.testing.assert_array_equal(np.load(out), np.sort(np.argsort(-fresh)[:5]))


def test_select_imports_neither_jax_nor_torch(world, tmp_path):
    """`dealrec select` runs in a process where importing jax or torch fails."""
    import subprocess
    import sys
    import textwrap

    run = tmp_path / "run"
    reps = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    save_scores(
        run / "user_representations.npy",
        reps,
        kind="representation",
        dataset=world["ds"].fingerprint(),
    )
    out = tmp_path / "sel.npy"
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib", "torch", "flax", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from jaxrec.cli import main
        code = main(["select", "--data", {str(world["root"] / "data")!r}, "--method", "tfdcon",
                     "--run", {str(run)!r}, "--n", "20", "--clusters", "4",
                     "--out", {str(out)!r}])
        assert not any(m.split(".")[0] in ("jax", "torch") for m in sys.modules), "imported"
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).size == 20


def test_representation_score_file_from_the_influence_command(trained_run, synthetic_dir, tmp_path):
    """tfdcon / recranker on a real trained surrogate: `dealrec influence --score
    representation` writes RUN/user_representations.npy, the hidden state at the newest train
    item (checked against an unbatched forward pass), which select then reads."""
    import shutil

    from jaxrec.data import left_pad
    from jaxrec.train import load_surrogate

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    reps_path = run / "user_representations.npy"
    assert (
        main(
            [
                "influence",
                "--score",
                "representation",
                "--run",
                str(run),
                "--out",
                str(reps_path),
                "--batch-size",
                "64",
                "--compile-cache",
                "",
            ]
        )
        == 0
    )
    args = [
        "select",
        "--data",
        str(synthetic_dir),
        "--run",
        str(run),
        "--n",
        "30",
        "--clusters",
        "4",
    ]
    assert main(args + ["--method", "tfdcon", "--out", str(tmp_path / "t.npy")]) == 0
    ds = load_dataset(synthetic_dir)
    reps, manifest = load_scores(reps_path, kind="representation", dataset=ds.fingerprint())
    sur = load_surrogate(run)
    direct = np.asarray(
        sur.user_representations(sur.params, left_pad(ds.train, sur.config.max_len))
    )
    assert reps.shape == (300, sur.config.hidden)
    np.testing.assert_allclose(reps, direct, rtol=1e-4, atol=1e-5)
    assert np.std(reps, axis=0).mean() > 1e-3  # users differ
    assert main(args + ["--method", "recranker", "--out", str(tmp_path / "r.npy")]) == 0
    _, sel_manifest = load_scores(tmp_path / "r.npy")
    assert sel_manifest["inputs"]["representations"]["sha256"] == _sha(reps_path)


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_and_experiment_add_the_score_stages_methods_need():
    from pathlib import Path

    from jaxrec.pipeline import add_score_stages, stage_argv
    from jaxrec.select import score_stages

    assert score_stages(["random", "dealrec", "greedy"]) == []
    assert score_stages(["recranker", "ccs", "grand", "el2n", "tfdcon"]) == [
        ("grand", "grand.npy"),
        ("el2n", "el2n.npy"),
        ("representation", "user_representations.npy"),
    ]
    wired = {"influence": {"run": "w/surrogate", "out": "w/influence.npy", "steps": 10}}
    assert add_score_stages(wired, ["ccs"]) == ["influence:el2n"]
    section = wired["influence:el2n"]
    assert section == {
        "run": "w/surrogate",
        "out": "w/surrogate/el2n.npy",
        "steps": 10,
        "score": "el2n",
    }
    assert stage_argv("influence:el2n", section, Path("r.yaml")) == [
        "influence",
        "--config",
        "r.yaml",
        "--score",
        "el2n",
        "--out",
        "w/surrogate/el2n.npy",
    ]
    assert stage_argv("select", {}, Path("r.yaml")) == ["select", "--config", "r.yaml"]


def test_early_grand_options_rerun_only_the_score_stages():
    """``influence: {score_model: early}`` reaches the GraNd / EL2N score stages (they read the
    influence section) and changes their reuse keys, not the influence stage's."""
    from jaxrec.pipeline import add_score_stages, baseline_score_options, stage_keys

    def keys(extra):
        wired = {"influence": {"run": "w/s", "out": "w/i.npy", **extra}, "select": {"n": 3}}
        stages = ["influence", *add_score_stages(wired, ["ccs"]), "select"]
        return stage_keys(stages, wired), wired

    plain, wired_plain = keys({})
    early, wired = keys({"score_model": "early", "early_inits": 3})
    assert wired["influence:el2n"]["score_model"] == "early"
    assert early["influence"] == plain["influence"]
    assert early["influence:el2n"] != plain["influence:el2n"]
    assert early["select"] != plain["select"]
    early_epochs = InfluenceConfig.early_epochs  # defaults are part of the key
    assert baseline_score_options(wired, "ccs") == [
        {"score_model": "early", "early_epochs": early_epochs, "early_inits": 3}
    ]
    assert baseline_score_options(wired, "dealrec") == []
    assert baseline_score_options(wired_plain, "grand") == [
        {"score_model": "trained", "early_epochs": early_epochs, "early_inits": 10}
    ]


def test_reuse_keys_cover_defaults():
    """A stage's reuse key covers its options with defaults filled in: spelling a default out
    keeps the key, a changed default (here as a value set in the file) changes it."""
    from jaxrec.pipeline import stage_keys

    def key(section):
        return stage_keys(["surrogate"], {"surrogate": section})["surrogate"]

    assert key({}) == key({"arch": SurrogateConfig.arch, "epochs": SurrogateConfig.epochs})
    other = "kang" if SurrogateConfig.arch == "official" else "official"
    assert key({"arch": other}) != key({})
