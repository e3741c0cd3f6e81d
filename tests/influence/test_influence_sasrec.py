"""The influence engine on a trained SASRec surrogate (issue 2, validation item 5) and the
``dealrec influence`` command end to end, including its bad-input behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

from jaxrec.cli import main as cli_main
from jaxrec.config import InfluenceConfig
from jaxrec.data import load_scores
from jaxrec.data.buckets import width_strata
from jaxrec.influence import ExactOptions, LissaOptions, ParamSubset, influence_scores
from jaxrec.influence.cli import compute

# the 64x64 block of the paper's code, item_encoder.layer.1.attention.dense.weight (4096 parameters)
BLOCK = r"^attn_out_1/kernel$"


@pytest.fixture(scope="module")
def surrogate(trained_run):
    from jaxrec.train import load_surrogate

    return load_surrogate(trained_run[0])


@pytest.fixture(scope="module")
def surrogate32(synthetic_dir, tmp_path_factory):
    """A SASRec surrogate of hidden size 32 on the same synthetic data: its attn_out_1 block is
    32x32, so the exact solve builds a 1024 x 1024 Hessian (the paper's 64x64 block takes 4096
    HVPs, minutes on the loaded CI machine, for the same comparison)."""
    from jaxrec.config import SurrogateConfig
    from jaxrec.train import load_surrogate, train

    out = tmp_path_factory.mktemp("run32")
    cfg = SurrogateConfig(
        data=str(synthetic_dir),
        out=str(out),
        hidden=32,
        max_len=20,
        epochs=20,
        batch_size=64,
        patience=20,
        dropout=0.2,
        seed=0,
    )
    train(cfg, progress=False)
    return load_surrogate(out)


def test_width_strata_keep_every_user_and_the_loss(surrogate):
    order, parts = width_strata(surrogate.data, surrogate.config.max_len)
    assert sorted(order.tolist()) == list(range(surrogate.dataset.n_users))
    cut = np.concatenate(
        [np.asarray(surrogate.per_sample_loss(surrogate.params, p)) for p in parts]
    )
    full = np.asarray(
        surrogate.per_sample_loss(
            surrogate.params, {k: surrogate.data[k] for k in ("inputs", "targets", "negatives")}
        )
    )
    np.testing.assert_allclose(cut, full[order], atol=1e-5)


def test_lissa_vs_exact_on_trained_sasrec_block(surrogate32):
    """LiSSA (paper settings: dealrec convention, d=0.01, s=25; 2000 steps, 0.99^2000 ~ 2e-9,
    so converged) against the exact float64 solve of the Hessian built from HVPs, on the
    paper's block (attn_out_1, item_encoder.layer.1.attention.dense.weight) of a trained
    SASRec of hidden size 32 (a 32x32 block: 1024 parameters)."""
    common = dict(params=BLOCK, convention="dealrec", damping=0.01, scale=25.0, negative_draws=1)
    exact, info_e = compute(  # 64 HVPs at a time: a quarter of the default chunk's memory
        InfluenceConfig(solver="exact", exact=ExactOptions(chunk=64), **common),
        surrogate32,
        progress=False,
    )
    lissa, info_l = compute(
        InfluenceConfig(solver="lissa", lissa=LissaOptions(steps=2000, batch_size=32), **common),
        surrogate32,
        progress=False,
    )
    assert info_e["n_params"] == 1024 and info_e["solver"]["dim"] == 1024
    rel = np.linalg.norm(lissa - exact) / np.linalg.norm(exact)
    rho = stats.spearmanr(lissa, exact)[0]
    print(
        f"\nSASRec 32x32 block {BLOCK}: LiSSA vs exact relative error {rel:.4f}, "
        f"Spearman {rho:.4f}, "
        f"Hessian eigenvalues [{info_e['solver']['eig_min']:.3g}, "
        f"{info_e['solver']['eig_max']:.3g}]"
    )
    assert rel < 0.1 and rho > 0.95


def test_cli_writes_scores_manifest_and_trace(trained_run, surrogate, tmp_path):
    out = tmp_path / "inf.npy"
    assert (
        cli_main(
            [
                "influence",
                "--run",
                str(trained_run[0]),
                "--out",
                str(out),
                "--steps",
                "300",
                "--params",
                "^ffn_",
            ]
        )
        == 0
    )
    scores, manifest = load_scores(out, kind="influence", dataset=surrogate.dataset.fingerprint())
    assert scores.dtype == np.float32 and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert manifest["solver"]["solver"] == "lissa" and manifest["param_filter"] == "^ffn_"
    assert set(manifest["timing"]) >= {"mean_gradient", "solve", "scores", "load"}
    trace = np.load(tmp_path / manifest["solver"]["norm_trace_file"], allow_pickle=False)
    assert trace.shape == (1, 300) and np.isfinite(trace).all()
    for score in ("grand", "el2n"):
        path = tmp_path / f"{score}.npy"
        assert (
            cli_main(
                ["influence", "--run", str(trained_run[0]), "--out", str(path), "--score", score]
            )
            == 0
        )
        s, _ = load_scores(path, kind=score, dataset=surrogate.dataset.fingerprint())
        assert np.isfinite(s).all() and (s >= 0).all()
    # GraNd of two users against a direct per-sample gradient norm
    grand, _ = load_scores(tmp_path / "grand.npy")
    for i in (0, 7):
        one = {
            k: jnp.asarray(surrogate.data[k][i : i + 1]) for k in ("inputs", "targets", "negatives")
        }
        g = jax.grad(lambda p: surrogate.per_sample_loss(p, one)[0])(surrogate.params)
        assert grand[i] == pytest.approx(float(jnp.linalg.norm(ravel_pytree(g)[0])), rel=1e-4)


def test_cli_equals_library_influence_scores(trained_run, surrogate, tmp_path):
    """`dealrec influence` is influence_scores(...) on the width buckets, nothing else, and
    both default to the same damping convention, damping and scale."""
    out = tmp_path / "inf.npy"
    assert (
        cli_main(
            [
                "influence",
                "--run",
                str(trained_run[0]),
                "--out",
                str(out),
                "--steps",
                "200",
                "--lissa-batch-size",
                "8",
                "--params",
                "^ffn_",
                "--seed",
                "3",
                "--compile-cache",
                "",
                "--negative-draws",
                "1",
                "--sample-loss",
                "training",  # g_i of the training loss: what influence_scores defaults to
            ]
        )
        == 0
    )
    got, manifest = load_scores(out, kind="influence")
    sub = ParamSubset(surrogate.params, "^ffn_")
    order, parts = width_strata(surrogate.data, surrogate.config.max_len)
    s, info = influence_scores(
        sub.restrict(surrogate.loss),
        sub.restrict(surrogate.per_sample_loss),
        sub.params,
        parts,
        solver=LissaOptions(steps=200, batch_size=8, seed=3),
    )  # no damping / convention / scale: the library's defaults must be the CLI's
    want = np.empty_like(s)
    want[order] = s
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert manifest["solver"]["steps_run"] == info["steps_run"] == [200]


def test_cli_translates_library_argument_names(trained_run, tmp_path, capsys):
    """The library names its arguments (scale=); the command line names its flags."""
    out = tmp_path / "x.npy"
    assert (
        cli_main(
            [
                "influence",
                "--run",
                str(trained_run[0]),
                "--out",
                str(out),
                "--params",
                "^ffn_2_1/kernel$",
                "--scale",
                "0.0001",
                "--steps",
                "500",
                "--compile-cache",
                "",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "use --scale " in err and "scale=" not in err and not out.exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--params", "^no_such_layer"], "matches no parameter"),
        (["--steps", "0"], "--steps 0"),
    ],
)
def test_cli_bad_input_exit_2_no_file(trained_run, tmp_path, capsys, flags, message):
    out = tmp_path / "x.npy"
    assert cli_main(["influence", "--run", str(trained_run[0]), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--solver", "--score", "--convention"])
def test_cli_literal_fields_are_choices(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["influence", flag, "newton"])
    assert e.value.code == 2 and "invalid choice: 'newton'" in capsys.readouterr().err


def test_cli_run_without_checkpoint(tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert cli_main(["influence", "--run", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "checkpoint" in capsys.readouterr().err and not out.exists()


def test_grand_el2n_early_training_variant_is_the_mean_over_inits(trained_run, tmp_path):
    """``--score-model early`` (Paul et al. 2021) with 2 initialisations equals the mean of the
    two single-initialisation scores, each computed independently from the bare
    initialisation (epoch 0) by the trained-surrogate path; after 1 epoch, one initialisation
    equals a fresh surrogate trained here with ``jaxrec.train.train`` and the same recipe."""
    import dataclasses
    import shutil

    from jaxrec.models import sasrec
    from jaxrec.train import load_surrogate, train

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)  # early/ is cached inside the run folder
    sur = load_surrogate(run)

    def single(score, params):
        cfg = InfluenceConfig(run=str(run), score=score)
        return compute(cfg, dataclasses.replace(sur, params=params), progress=False)[0]

    for score in ("grand", "el2n"):
        cfg = InfluenceConfig(
            run=str(run), score=score, score_model="early", early_epochs=0, early_inits=2, seed=5
        )
        got, info = compute(cfg, sur, progress=False)
        assert info["early"] == {"epochs": 0, "seeds": [5, 6]}
        inits = [
            single(score, sasrec.init_params(sur.model, jax.random.PRNGKey(k))) for k in (5, 6)
        ]
        assert not np.allclose(inits[0], inits[1], rtol=1e-3)  # the inits do differ
        np.testing.assert_allclose(got, (inits[0] + inits[1]) / 2, rtol=1e-5)
        trained = single(score, sur.params)
        assert not np.allclose(got, trained, rtol=1e-2)

    cfg1 = InfluenceConfig(
        run=str(run), score="grand", score_model="early", early_epochs=1, early_inits=1, seed=3
    )
    got1, _ = compute(cfg1, sur, progress=False)
    out = tmp_path / "independent"
    recipe = dataclasses.replace(
        sur.config, data=str(sur.dataset.path), out=str(out), epochs=1, seed=3
    )
    train(recipe, progress=False)
    np.testing.assert_allclose(got1, single("grand", load_surrogate(out).params), rtol=1e-5)
    again, _ = compute(cfg1, sur, progress=False)  # the cached run: nothing retrained
    np.testing.assert_array_equal(again, got1)


def test_negative_draws_one_is_today_and_two_is_the_draw_averaged_loss(surrogate):
    """``negative_draws=1`` is today's influence bit for bit; ``negative_draws=2`` equals the
    single-draw path run on the data with every user twice (once per draw): its mean gradient
    and Hessian are the draw-averaged ones, and user i's score is the mean of its two rows'
    (times 4: Eq. 11 divides by n^2, and n doubled). Exact solver on a 64-parameter block."""
    from jaxrec.train import training_data

    block = r"^attn_out_1/bias$"
    common = dict(
        params=block,
        solver="exact",
        convention="dealrec",
        damping=0.01,
        scale=25.0,
        sample_loss="training",  # scores_of scores with the training loss's g_i
    )
    sub = ParamSubset(surrogate.params, block)
    loss, psl = sub.restrict(surrogate.loss), sub.restrict(surrogate.per_sample_loss)
    opts = dict(solver="exact", damping=0.01, convention="dealrec", scale=25.0)

    def scores_of(data):
        order, parts = width_strata(data, surrogate.config.max_len)
        s, _ = influence_scores(loss, psl, sub.params, parts, **opts)
        out = np.empty_like(s)
        out[order] = s
        return out

    today = scores_of(surrogate.data)
    k1, _ = compute(InfluenceConfig(negative_draws=1, **common), surrogate, progress=False)
    np.testing.assert_array_equal(k1, today)

    k2, info = compute(InfluenceConfig(negative_draws=2, **common), surrogate, progress=False)
    seed = surrogate.config.seed
    assert info["solver"]["negative_seeds"] == [seed, seed + 1]
    second = training_data(surrogate.config, surrogate.data, surrogate.dataset, 0, seed + 1)
    twice = {k: np.concatenate([surrogate.data[k], second[k]]) for k in surrogate.data}
    rows = scores_of(twice)
    n = surrogate.dataset.n_users
    want = 4.0 * (rows[:n] + rows[n:]) / 2
    np.testing.assert_allclose(k2, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    assert np.abs(k2 - today).max() > 0.05 * np.abs(today).max()  # the second draw matters
    # another seed offset is another single draw
    k1b, _ = compute(
        InfluenceConfig(negative_draws=1, negative_seed=1, **common), surrogate, progress=False
    )
    one = scores_of(second)
    np.testing.assert_allclose(k1b, one, rtol=1e-4, atol=1e-5 * np.abs(one).max())
