"""The LDS study (jaxrec/lds.py): scoring against scipy and a hand example, LDS of exact
influence on a convex toy (ridge regression, retrained in closed form) near 1, of shuffled
attributions near 0, and resuming a killed run."""

from __future__ import annotations

import dataclasses
import json
import shlex

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrec import lds
from jaxrec.config import ArnoldiOptions, CGOptions, ExactOptions
from jaxrec.influence import attribution as at
from jaxrec.lds import study


# ----------------------------------------------------------------------------- scoring pieces
def test_spearman_columns_matches_scipy_with_ties():
    x = np.array([[1.0, 3.0], [2.0, 3.0], [2.0, 1.0], [5.0, 0.0], [4.0, 2.0]])
    y = np.array([[0.5, 1.0], [0.1, 2.0], [0.7, 2.0], [0.9, 3.0], [0.2, 5.0]])
    got = lds.spearman_columns(x, y)
    want = [stats.spearmanr(x[:, c], y[:, c]).statistic for c in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # hand example: perfectly reversed ranks
    np.testing.assert_allclose(
        lds.spearman_columns([[1.0], [2.0], [3.0]], [[3.0], [2.0], [1.0]]), [-1.0]
    )
    assert np.isnan(lds.spearman_columns([[1.0], [1.0], [1.0]], [[1.0], [2.0], [3.0]])[0])


def test_predictions_and_lds_per_user_by_hand():
    a = np.array([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])  # 3 train samples x 2 validation users
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], bool)
    np.testing.assert_allclose(lds.predictions(a, masks), [[-3, -1], [-2, -4], [-1, -3]])
    losses = np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.5]])
    # user 0: predictions -3,-2,-1 vs 0.1,0.2,0.3 -> 1; user 1: -1,-4,-3 vs 0.9,0.1,0.5 -> 1
    np.testing.assert_allclose(lds.lds_per_user(a, masks, losses), [1.0, 1.0])


def test_bootstrap_ci_matches_scipy_percentile():
    values = np.random.default_rng(3).normal(0.4, 0.2, 40)
    lo, hi = lds.bootstrap_ci(values, resamples=20000, seed=1)
    ref = stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", random_state=2
    ).confidence_interval
    assert lo < values.mean() < hi
    assert abs(lo - ref.low) < 0.01 and abs(hi - ref.high) < 0.01


def test_paired_difference_by_hand():
    d = lds.paired_difference([0.5, 0.2, np.nan, 0.9], [0.1, 0.2, 0.3, 0.5], resamples=200)
    assert d["mean"] == pytest.approx((0.4 + 0.0 + 0.4) / 3)
    assert d["ci_low"] >= 0.0 and d["ci_high"] == pytest.approx(0.4)


def test_draw_subsets_fraction_and_prefix():
    m = lds.draw_subsets(40, 6, 0.5, seed=4)
    assert m.shape == (6, 40) and (m.sum(1) == 20).all()
    np.testing.assert_array_equal(lds.draw_subsets(40, 3, 0.5, seed=4), m[:3])


# ----------------------------------------------------------------------------- convex toy
RIDGE = 1.0


def _toy(n=400, v=30, d=5, seed=0):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    x = rng.normal(size=(n + v, d))
    y = x @ w_true + rng.normal(size=n + v)
    train = {"x": x[:n].astype(np.float32), "y": y[:n].astype(np.float32)}
    valid = {"x": x[n:].astype(np.float32), "y": y[n:].astype(np.float32)}
    return train, valid


def _psl(p, b):  # per-sample training loss: squared error + the ridge term
    return 0.5 * (b["x"] @ p["w"] - b["y"]) ** 2 + 0.5 * RIDGE * jnp.sum(p["w"] ** 2)


def _loss(p, b):
    return jnp.mean(_psl(p, b))


def _val_psl(p, b):
    return 0.5 * (b["x"] @ p["w"] - b["y"]) ** 2


def _fit(x, y):  # closed-form minimiser of the mean training loss (float64)
    d = x.shape[1]
    return np.linalg.solve(x.T @ x / len(x) + RIDGE * np.eye(d), x.T @ y / len(x))


def _attribution(options, params, train, valid):
    """``a[i, j]`` of the library estimator ``options``: training rows x validation rows, the
    validation loss without the ridge term (``query_loss``)."""
    state = at.fit(options, _loss, _psl, params, train, query_loss=_val_psl)
    return at.attribute(state, train, valid)


def _toy_study(m=60):
    train, valid = _toy()
    x, y = train["x"].astype(np.float64), train["y"].astype(np.float64)
    xv, yv = valid["x"].astype(np.float64), valid["y"].astype(np.float64)
    params = {"w": jnp.asarray(_fit(x, y), jnp.float32)}
    opts = at.InfluenceOptions(ExactOptions(), convention="standard", damping=0.0)
    attr = _attribution(opts, params, train, valid)
    masks = lds.draw_subsets(len(x), m, 0.5, seed=1)

    def retrain_losses(mask, seed):
        w = _fit(x[mask], y[mask])
        return 0.5 * (xv @ w - yv) ** 2

    losses = lds.retrained_losses(retrain_losses, masks, [0])
    return attr, masks, losses


def test_exact_influence_on_ridge_has_lds_near_one_and_shuffled_near_zero():
    attr, masks, losses = _toy_study()
    shuffled = attr[np.random.default_rng(5).permutation(len(attr))]
    res = lds.score({"exact": attr, "shuffled": shuffled}, masks, losses, resamples=500)
    print({k: round(v["lds"], 3) for k, v in res.items()})
    assert res["exact"]["lds"] > 0.9
    assert res["exact"]["ci_low"] <= res["exact"]["lds"] <= res["exact"]["ci_high"]
    assert abs(res["shuffled"]["lds"]) < 0.2


def test_solvers_agree_with_exact_on_ridge():
    train, valid = _toy()
    params = {
        "w": jnp.asarray(_fit(train["x"].astype(float), train["y"].astype(float)), jnp.float32)
    }
    exact = _attribution(at.InfluenceOptions(ExactOptions(), damping=0.01), params, train, valid)
    cg = _attribution(at.InfluenceOptions(CGOptions(), damping=0.01), params, train, valid)
    arn = _attribution(at.InfluenceOptions(ArnoldiOptions(), damping=0.01), params, train, valid)
    np.testing.assert_allclose(cg, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())
    np.testing.assert_allclose(arn, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())
    # grad-dot by hand: g_i . g_j
    gi = (train["x"] @ np.asarray(params["w"]) - train["y"])[:, None] * train[
        "x"
    ] + RIDGE * np.asarray(params["w"])
    gj = (valid["x"] @ np.asarray(params["w"]) - valid["y"])[:, None] * valid["x"]
    np.testing.assert_allclose(
        _attribution(at.GradDotOptions(), params, train, valid), gi @ gj.T, rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------------------- resume
def test_killed_and_resumed_retraining_gives_identical_losses(tmp_path):
    calls = []

    def retrain_losses(mask, seed):
        calls.append((mask.tobytes(), seed))
        if len(calls) == 4 and not (tmp_path / "done").exists():
            raise KeyboardInterrupt  # killed mid-run
        rng = np.random.default_rng([int(mask.sum()), seed, int(np.flatnonzero(mask)[0])])
        return rng.normal(size=3)

    masks = lds.draw_subsets(10, 4, 0.5, seed=0)
    with pytest.raises(KeyboardInterrupt):
        lds.retrained_losses(retrain_losses, masks, [0, 1], tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    (tmp_path / "done").touch()
    calls.clear()
    resumed = lds.retrained_losses(retrain_losses, masks, [0, 1], tmp_path / "cache")
    assert len(calls) == 5  # only the retrains the killed run had not finished
    fresh = lds.retrained_losses(retrain_losses, masks, [0, 1])
    np.testing.assert_array_equal(resumed, fresh)


def test_command_on_synthetic_data_resumes_after_a_kill(tmp_path):
    """``dealrec lds`` end to end on a tiny synthetic set; then the files a killed run would
    not have written yet (one retrain, one attribution, the results) are removed and the run
    continues to the same results."""
    from jaxrec.cli import main
    from jaxrec.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", n_users=60, n_items=30, seed=0)
    out = tmp_path / "lds"
    args = [
        "lds",
        "--data",
        str(data),
        "--users",
        "0",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--subsets",
        "3",
        "--val-users",
        "4",
        "--attributions",
        "exact",
        "grad-dot",
        "dealrec",
        "--lissa-steps",
        "200",
        "--negative-draws",
        "2",
        "--params",
        "^attn_out_1/bias$",
        "--bootstrap",
        "50",
        "--compile-cache",
        "",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert set(first["lds"]) == {"exact", "grad-dot", "dealrec"} and first["subsets"] == 3
    # the dealrec row is the influence stage's score, cached under its own options
    assert len(list(out.glob("attributions/dealrec_*_v2_*.npy"))) == 1
    assert (out / "results.md").is_file() and (out / "lds.png").is_file()
    retrained = sorted(out.glob("retrained/*/*.npy"))
    assert len(retrained) == 3
    retrained[-1].unlink()
    next(out.glob("attributions/grad-dot_*.npy")).unlink()
    (out / "results.json").unlink()
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["lds"] == first["lds"] and again["per_user"] == first["per_user"]
    # other settings on the same folder are refused, not mixed
    assert main([*args, "--epochs", "2"]) == 2


def test_dealrec_row_takes_the_influence_stage_options():
    """``dealrec lds``'s dealrec row runs ``dealrec_scores`` with an ``InfluenceConfig``: the
    influence stage's defaults (32 negative draws, the per-user sample loss) and the LDS run's
    block, damping convention and LiSSA settings; only that row's cache name keys them."""
    from jaxrec.config import InfluenceConfig, LdsConfig, LissaOptions

    cfg = LdsConfig(params="^x$", damping=0.02, lissa=LissaOptions(steps=300), seed=4)
    got = lds.influence_config(cfg)
    want = InfluenceConfig(
        solver="lissa", params="^x$", damping=0.02, lissa=LissaOptions(steps=300), seed=4
    )
    assert got == want and got.negative_draws == 32 and got.sample_loss == "per-user"
    other = dataclasses.replace(cfg, negative_draws=1)
    assert study._dealrec_tag(other) != study._dealrec_tag(cfg)
    keys = study._key_names(cfg, study._SCORING_ONLY | study._DEALREC_ONLY)
    assert {"lissa_steps", "seed"} <= keys and got.lissa.seed == 4
    assert study._fingerprint(other, keys) == study._fingerprint(cfg, keys)


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--alpha", "1.5"], "--alpha 1.5"),
        (["--params", "attn_out_1/kernel("], "--params"),
        (["--params", "^no_such_leaf$"], "matches no parameter path"),
        (["--params", ""], "the exact attribution takes at most"),
        (["--seeds", "0", "--val-users", "0"], "--seeds 0, --val-users 0: must be >= 1"),
        (["--subsets", "1"], "--subsets 1"),
    ],
)
def test_bad_options_exit_2_before_anything_is_written(tmp_path, capsys, flags, words):
    """Checked before OUT (its data slice, settings.json) exists, so a corrected rerun is not
    blocked; the message names the flags as spelled and no --solver (lds has none)."""
    from jaxrec.cli import main
    from jaxrec.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", n_users=40, n_items=20, seed=0)
    out = tmp_path / "lds"
    argv = ["lds", "--data", str(data), "--users", "20", "--compile-cache", "", "--out", str(out)]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "--solver" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- every estimator
def test_every_estimator_runs_in_the_command_and_reports_its_cost(tmp_path):
    """``dealrec lds`` with the estimators beyond the solvers (Grad-Cos, K-FAC, EK-FAC, TRAK,
    TracIn-CP over the full model's epochs, DataInf) on a tiny synthetic set: each row has a
    finite LDS and its seconds and peak memory; its attributions are cached in user order."""
    from jaxrec.cli import main
    from jaxrec.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", n_users=40, n_items=20, seed=0)
    out = tmp_path / "lds"
    names = ["grad-dot", "grad-cos", "kfac", "ekfac", "trak", "tracin", "datainf"]
    argv = ["lds", "--data", str(data), "--users", "0", "--epochs", "2", "--seeds", "1"]
    argv += ["--subsets", "3", "--val-users", "3", "--bootstrap", "20", "--trak-dim", "32"]
    argv += ["--params", "^attn_out_1/kernel$", "--compile-cache", "", "--out", str(out)]
    assert main([*argv, "--attributions", *names]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["lds"]) == names
    for name in names:
        cost = res["costs"][name]
        assert cost["seconds"]["total"] > 0 and cost["host_peak_rss_bytes"] > 0, name
        a = np.load(next(out.glob(f"attributions/{name}_*.npy")))
        assert a.shape == (40, 3) and np.all(np.isfinite(a)), name
    # grad-cos is grad-dot over the two gradient norms: same signs, |cos| <= 1
    dot = np.load(next(out.glob("attributions/grad-dot_*.npy")))
    cos = np.load(next(out.glob("attributions/grad-cos_*.npy")))
    assert np.all(np.abs(cos) <= 1 + 1e-6) and np.all(np.sign(cos) == np.sign(dot))
    assert "seconds" in (out / "results.md").read_text()


def test_renamed_solver_options_keep_their_old_spellings_and_keys():
    """``dealrec lds`` names the solver options as ``dealrec influence`` does (steps, tol,
    maxiter, rank, iterations); the old spellings still parse, and a run's folder records
    them under the old names, so an archived run's settings.json still matches."""
    from jaxrec.cli import build_parser
    from jaxrec.config import LdsConfig
    from jaxrec.config_io import config_from_args, make_config

    args = build_parser().parse_args(["lds", "--lissa-steps", "7", "--cg-tol", "1e-3"])
    got = config_from_args(LdsConfig, args, "lds")
    assert (got.lissa.steps, got.cg.tol) == (7, 1e-3)
    assert make_config(LdsConfig, {"arnoldi_rank": 5, "iterations": 9}).arnoldi.rank == 5
    with pytest.raises(Exception, match="name one option"):
        make_config(LdsConfig, {"arnoldi_rank": 5, "rank": 6})
    with pytest.raises(Exception, match="name one option"):  # flat and nested at once
        make_config(LdsConfig, {"steps": 5, "lissa": {"steps": 6}})
    # the nested form reads the same options and records the same settings
    nested = make_config(LdsConfig, {"lissa": {"steps": 7}, "cg": {"tol": 1e-3}})
    assert nested == got and study.settings(nested) == study.settings(got)
    archived = json.loads(open("results/lds/sasrec_m100_s0/settings.json").read())
    cfg = make_config(LdsConfig, {**archived, "out": "x"})
    keep = {k: v for k, v in study.settings(cfg).items() if k in archived}
    assert keep == archived and set(study.settings(cfg)) - set(archived) <= (
        study._SCORING_ONLY | study._DEALREC_ONLY
    )


def test_estimator_options_are_the_library_objects_under_their_flat_names():
    """``dealrec lds`` nests the estimators' option objects (KFACOptions, ...) that
    attribution.fit takes; the flat keys of before set them (kfac and ekfac share fisher and
    kfac_damping_scale, datainf the latter; seed is the config's), settings.json records them
    by those names only when not at their defaults, and diverging shared values are refused."""
    from jaxrec.config import EKFACOptions, KFACOptions, LdsConfig, TRAKOptions
    from jaxrec.config_io import make_config

    cfg = make_config(LdsConfig, {"fisher": "sampled", "kfac_damping_scale": 0.5, "seed": 2})
    assert lds.estimator_options("kfac", cfg) == KFACOptions("sampled", None, 0.5, 2)
    assert lds.estimator_options("ekfac", cfg) == EKFACOptions("sampled", None, 0.5, 2)
    assert lds.estimator_options("trak", cfg) == TRAKOptions(seed=2)
    assert lds.estimator_options("datainf", cfg).damping_scale == 0.5
    nested = make_config(LdsConfig, {"trak": {"dim": 64, "damping": 0.1}})
    assert study.settings(nested)["trak_dim"] == 64 and nested.trak.damping == 0.1
    assert study.settings(nested)["trak.damping"] == 0.1  # no flat name: dotted, not default
    assert not {"fisher", "kfac_damping_scale", "trak_dim"} & set(study.settings(LdsConfig()))
    with pytest.raises(Exception, match="share the option fisher"):
        make_config(LdsConfig, {"kfac": {"fisher": "sampled"}})


def test_the_leaderboard_config_parses_and_plans(capsys):
    """configs/studies/lds_leaderboard.yaml: SASRec and GRU4Rec, two slices, M = 100, 2 seeds,
    64 validation users, every estimator; each study's command line parses."""
    from jaxrec.cli import build_parser
    from jaxrec.lds import leaderboard

    path = "configs/studies/lds_leaderboard.yaml"
    studies = leaderboard.plan(path)
    assert [(c.model, c.seed) for c in studies] == [
        ("sasrec", 0),
        ("sasrec", 1),
        ("gru4rec", 0),
        ("gru4rec", 1),
    ]
    for c in studies:
        assert (c.subsets, c.seeds, c.val_users, c.users) == (100, 2, 64, 600)
        assert set(c.attributions) == set(lds.ATTRIBUTIONS)
        assert c.out == f"results/lds/{c.model}_m100_s{c.seed}"
    assert studies[0].params == "official" and studies[2].params == "^out/kernel$"
    assert leaderboard.main([path, "--plan"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line, c in zip(lines, studies):
        args = build_parser().parse_args(shlex.split(line)[3:])
        assert args.out == c.out and args.attributions == c.attributions
