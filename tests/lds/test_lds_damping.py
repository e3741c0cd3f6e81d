"""bench/lds_damping.py (issue 27, section 3): the exact influence of every damping from one
eigendecomposition equals a dense solve per damping and the library's exact estimator; the
script on a tiny ``dealrec lds`` study reproduces its cached attributions and LDS (the
command of docs/benchmarks.md, "Damping sweep on SASRec slice 0")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.config import ExactOptions
from jaxrec.influence import attribution as at

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("lds_damping", ROOT / "bench" / "lds_damping.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _psl(p, b):  # a non-convex per-sample loss: its Hessian is indefinite away from a minimum
    return 0.5 * (jnp.tanh(b["x"] @ p["w"]) * 2.0 - b["y"]) ** 2


def _loss(p, b):
    return jnp.mean(_psl(p, b))


def _toy(n=50, v=7, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + v, d)).astype(np.float32)
    y = rng.normal(size=n + v).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=d), jnp.float32)}
    return params, {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}


def _grads(params, data):  # batch-1 autograd, float64 reference
    one = jax.grad(lambda p, x, y: _psl(p, {"x": x[None], "y": y[None]})[0])
    g = jax.vmap(lambda x, y: one(params, x, y)["w"])
    return np.asarray(g(data["x"], data["y"]), np.float64)


def test_eigenbasis_equals_dense_solve_and_the_library_exact_estimator():
    bench = _bench()
    params, train, valid = _toy()
    h = np.asarray(jax.hessian(_loss)(params, train)["w"]["w"], np.float64)
    h = 0.5 * (h + h.T)  # float32 autodiff: symmetric to rounding only (the library does so)
    eig, vec = np.linalg.eigh(h)
    assert eig.min() < 0 < eig.max()  # the indefinite case is the one that matters here
    g_tr, g_q = _grads(params, train), _grads(params, valid)
    for lam in (1e-3, 0.05, 0.25, 2.0, 30.0):
        want = 25.0 * g_tr @ np.linalg.solve(h + lam * np.eye(len(h)), g_q.T)
        got = bench.eigen_attributions(g_tr, g_q, eig, vec, lam, 25.0)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # the library's exact estimator, dealrec convention: 25 (H + 25 * 0.01 I)^-1
    opts = at.InfluenceOptions(ExactOptions(), damping=0.01, convention="dealrec", scale=25.0)
    lam, factor = at.effective_damping(0.01, "dealrec", 25.0)
    lib = at.attribute(at.fit(opts, _loss, _psl, params, train), train, valid)
    got = bench.eigen_attributions(g_tr, g_q, eig, vec, lam, factor)
    assert bench.max_relative_difference(got, lib) < 1e-4
    # a large damping: the ranking of grad-dot (Spearman exactly 1 in the limit)
    far = bench.eigen_attributions(g_tr, g_q, eig, vec, 1e6, 1.0) * 1e6
    np.testing.assert_allclose(far, g_tr @ g_q.T, rtol=1e-4, atol=1e-6)
    spec = bench.spectrum(eig, 0.25)
    assert spec["negative"] == int((eig < 0).sum()) and spec["dim"] == 6
    assert spec["above_lam"] == int((eig > 0.25).sum()) and spec["min"] == eig.min()


def test_the_command_reproduces_a_tiny_study(tmp_path):
    """``dealrec lds`` on a tiny synthetic set, then the bench on its folder: the check passes,
    and at the study's own damping the sweep's LDS is the study's exact LDS."""
    from jaxrec.cli import main
    from jaxrec.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", n_users=60, n_items=30, seed=0)
    study = tmp_path / "lds"
    argv = ["lds", "--data", str(data), "--users", "0", "--epochs", "1", "--seeds", "1"]
    argv += ["--subsets", "6", "--val-users", "4", "--bootstrap", "50"]
    argv += ["--attributions", "exact", "grad-dot", "--params", "^attn_out_1/bias$"]
    assert main([*argv, "--out", str(study)]) == 0
    res = json.loads((study / "results.json").read_text())
    bench = _bench()
    # --cached-only: the study's own rows, and their distance from grad-dot
    assert bench.main(["--study", str(study), "--out", str(tmp_path / "c"), "--cached-only"]) == 0
    cached = json.loads((tmp_path / "c" / "damping.json").read_text())["cached"]
    assert cached["lds"]["exact"]["lds"] == res["lds"]["exact"]["lds"]
    assert set(cached["curvature"]) == {"exact"} and cached["curvature"]["exact"]["lam"] == 0.25
    # the sweep: the Hessian once, every damping from its eigenbasis
    hess = tmp_path / "h.npy"
    args = ["--study", str(study), "--out", str(tmp_path / "out"), "--hessian", str(hess)]
    assert bench.main([*args, "--lams", "1e-3", "1"]) == 0
    out = json.loads((tmp_path / "out" / "damping.json").read_text())
    assert out["checks"]["passed"] and out["checks"]["max_relative_difference"]["exact"] < 1e-4
    row = next(r for r in out["sweep"]["exact"] if r["lam"] == out["study"]["lam"] == 0.25)
    assert row["lds"] == pytest.approx(res["lds"]["exact"]["lds"], abs=1e-9)
    assert len(out["sweep"]["exact"]) == 3 and (tmp_path / "out" / "damping.png").is_file()
    assert hess.is_file() and bench.main([*args, "--lams", "1e-3"]) == 0  # from the cache
