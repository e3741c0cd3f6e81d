"""The attribution API (jaxrec.influence.attribution) and its estimators, each against an
independent reference: Hessians and Gauss-Newton matrices built with jax.hessian /
jax.jacobian on flat parameters, per-sample gradients by a batch-1 jax.grad loop, and the
current jaxrec.lds attributions for the wrapped solvers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxrec.config import ArnoldiOptions, CGOptions, ExactOptions, LissaOptions
from jaxrec.errors import UserError
from jaxrec.influence import attribution as at
from jaxrec.influence.datainf import DataInfOptions
from jaxrec.influence.kfac import EKFACOptions, KFACOptions
from jaxrec.influence.tracin import TracInOptions
from jaxrec.influence.trak import TRAKOptions


class MLP(nn.Module):
    hidden: int = 5
    out: int = 3

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, name="d1")(x))
        return nn.Dense(self.out, name="d2")(h)


class Linear(nn.Module):
    out: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out, name="lin")(x)


def problem(model, n=40, q=6, shape=(4,), out=3, seed=0):
    """Squared loss 0.5 |f(x) - y|^2 per sample (summed over token and output axes): its
    output Hessian is the identity, so f itself is the whitened output of the Gauss-Newton."""
    rng = np.random.default_rng(seed)

    def make(m):
        return {
            "x": rng.normal(size=(m, *shape)).astype(np.float32),
            "y": rng.normal(size=(m, *shape[:-1], out)).astype(np.float32),
        }

    train, query = make(n), make(q)
    params = model.init(jax.random.PRNGKey(seed), train["x"][:1])["params"]

    def output(p, b):
        f = model.apply({"params": p}, b["x"])
        return f.reshape(f.shape[0], -1)

    def per_sample_loss(p, b):
        r = output(p, b) - b["y"].reshape(b["y"].shape[0], -1)
        return 0.5 * jnp.sum(r**2, -1)

    def loss(p, b):
        return jnp.mean(per_sample_loss(p, b))

    return loss, per_sample_loss, output, params, train, query


def rows(data):
    n = len(jax.tree.leaves(data)[0])
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(n)]


def grads_loop(per_sample_loss, params, data):
    """[n, d]: each row's gradient by its own jax.grad call (batch of one)."""
    flat, unravel = ravel_pytree(params)
    g = jax.jit(jax.grad(lambda t, b: per_sample_loss(unravel(t), b)[0]))
    return np.stack([np.asarray(g(flat, r), np.float64) for r in rows(data)])


def gauss_newton(output, params, data):
    """(1/n) sum_i J_i^T J_i with J_i = d output_i / d theta by jax.jacobian."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacobian(lambda t, b: output(unravel(t), b)[0]))
    js = [np.asarray(jac(flat, r), np.float64) for r in rows(data)]
    return sum(j.T @ j for j in js) / len(js)


def close(a, b, tol=1e-4):
    scale = np.abs(b).max()
    assert scale > 1e-3  # not trivially zero
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


# ----------------------------------------------------------------------------- solvers
@pytest.fixture(scope="module")
def mlp():
    return problem(MLP())


def test_exact_influence_equals_hessian_inverse(mlp):
    loss, psl, _, params, train, query = mlp
    flat, unravel = ravel_pytree(params)
    h = np.asarray(jax.hessian(lambda t: loss(unravel(t), train))(flat), np.float64)
    gt, gq = grads_loop(psl, params, train), grads_loop(psl, params, query)
    for convention, lam, factor in (("standard", 0.05, 1.0), ("dealrec", 25 * 0.05, 25.0)):
        opts = at.InfluenceOptions(solver=ExactOptions(), damping=0.05, convention=convention)
        a, info = at.attribute_with_info(at.fit(opts, loss, psl, params, train), train, query)
        want = factor * gt @ np.linalg.solve(h + lam * np.eye(len(h)), gq.T)
        close(a, want)
    assert a.shape == (40, 6)
    assert info["estimator"] == "influence"
    assert set(info["seconds"]) == {"fit", "attribute", "total"}
    assert info["memory"]["fit"]["host_peak_rss_bytes"] > 0


def _per_vector_attribution(loss, psl, params, train, query, solver, **kw):
    """The reference route the LDS study took before it called the library: one
    ``inverse_hvp`` per query gradient (a batch-1 gradient loop), then one
    ``sample_scores`` JVP pass per solved vector."""
    from jaxrec.influence import inverse_hvp, mean_gradient, sample_scores

    rows = jax.tree.leaves(query)[0].shape[0]
    cols = []
    for j in range(rows):
        g = mean_gradient(psl, params, jax.tree.map(lambda x, j=j: np.asarray(x)[j : j + 1], query))
        u = g if solver is None else inverse_hvp(loss, params, train, g, solver=solver, **kw)
        cols.append(sample_scores(psl, params, train, u))
    return np.stack(cols, 1).astype(np.float64)


def test_solver_estimators_equal_lds_attributions(mlp):
    """The wrapped solvers give the numbers of the per-vector route the LDS study used
    (one inverse-HVP per query, then one JVP pass each)."""
    loss, psl, _, params, train, query = mlp
    kw = dict(damping=0.05, convention="dealrec", scale=25.0)
    a = at.attribute(
        at.fit(at.InfluenceOptions(ExactOptions(), **kw), loss, psl, params, train), train, query
    )
    close(a, _per_vector_attribution(loss, psl, params, train, query, ExactOptions(), **kw))
    cg = at.attribute(
        at.fit(at.InfluenceOptions(CGOptions(tol=1e-8), **kw), loss, psl, params, train),
        train,
        query,
    )
    close(cg, a, 1e-3)
    lissa = LissaOptions(steps=60, batch_size=8, chunk=30)
    got = at.attribute(
        at.fit(at.InfluenceOptions(lissa, **kw), loss, psl, params, train), train, query
    )
    close(got, _per_vector_attribution(loss, psl, params, train, query, lissa, **kw))
    arn = ArnoldiOptions(rank=5, iterations=12)
    got = at.attribute(
        at.fit(at.InfluenceOptions(arn, **kw), loss, psl, params, train), train, query
    )
    close(got, _per_vector_attribution(loss, psl, params, train, query, arn, **kw))
    got = at.attribute(at.fit(at.GradDotOptions(), loss, psl, params, train), train, query)
    close(got, _per_vector_attribution(loss, psl, params, train, query, None))
    close(got, grads_loop(psl, params, train) @ grads_loop(psl, params, query).T)


def test_dealrec_scores_equal_influence_scores(mlp):
    from jaxrec.influence import influence_scores

    loss, psl, _, params, train, _ = mlp
    opts = at.influence_options("exact", damping=0.05)
    s = at.risk_scores(at.fit(opts, loss, psl, params, train), train)
    want, _ = influence_scores(loss, psl, params, train, solver="exact", damping=0.05)
    close(s, np.asarray(want, np.float64))


def test_grad_cos_by_hand(mlp):
    loss, psl, _, params, train, query = mlp
    gt, gq = grads_loop(psl, params, train), grads_loop(psl, params, query)
    want = (gt / np.linalg.norm(gt, axis=1)[:, None]) @ (gq / np.linalg.norm(gq, axis=1)[:, None]).T
    got = at.attribute(at.fit(at.GradCosOptions(), loss, psl, params, train), train, query)
    close(got, want)
    assert np.abs(got).max() <= 1 + 1e-6


def test_tracin_brute_force(mlp):
    loss, psl, _, params, train, query = mlp
    leaves = jax.tree.leaves(params)
    cks = [jax.tree.map(lambda x, i=i: x * (1 + 0.3 * i) + 0.05 * i, params) for i in range(3)]
    lrs = [0.1, 0.05, 0.01]
    want = sum(
        lr * grads_loop(psl, p, train) @ grads_loop(psl, p, query).T for p, lr in zip(cks, lrs)
    )
    state = at.fit(TracInOptions(), loss, psl, at.Checkpoints(cks, lrs), train)
    close(at.attribute(state, train, query), want)
    assert leaves  # the checkpoints differ from params
    with pytest.raises(UserError, match="learning_rates"):
        at.fit(TracInOptions(), loss, psl, params, train)


def test_datainf_brute_force(mlp):
    """Eq. 5-6 of Kwon et al. 2024 in NumPy, per parameter leaf, with the paper's damping."""
    loss, psl, _, params, train, query = mlp
    gt, gq = grads_loop(psl, params, train), grads_loop(psl, params, query)
    sizes = [x.size for x in jax.tree.leaves(params)]  # ravel_pytree order = leaves order
    want = np.zeros((len(gt), len(gq)))
    start = 0
    for d in sizes:
        g, v = gt[:, start : start + d], gq[:, start : start + d]
        lam = 0.1 * np.mean(g**2)
        inv = sum(np.eye(d) - np.outer(x, x) / (lam + x @ x) for x in g) / (len(g) * lam)
        want += g @ inv @ v.T
        start += d
    got = at.attribute(at.fit(DataInfOptions(), loss, psl, params, train), train, query)
    close(got, want)


# ----------------------------------------------------------------------------- K-FAC
def test_kfac_equals_gauss_newton_on_a_linear_layer():
    """One Dense layer, squared loss: A (x) S is the exact Gauss-Newton matrix (S = I), so
    K-FAC and EK-FAC influence equal g_i (GN + lam I)^-1 g_j."""
    loss, psl, output, params, train, query = problem(Linear())
    gn = gauss_newton(output, params, train)
    gt, gq = grads_loop(psl, params, train), grads_loop(psl, params, query)
    want = gt @ np.linalg.solve(gn + 0.1 * np.eye(len(gn)), gq.T)
    for cls in (KFACOptions, EKFACOptions):
        opts = cls(fisher="gauss-newton", damping=0.1)
        state = at.fit(opts, loss, psl, params, train, output=output)
        close(at.attribute(state, train, query), want)
    # the empirical Fisher is another matrix: K-FAC then differs from the GN influence
    emp = at.attribute(at.fit(KFACOptions(damping=0.1), loss, psl, params, train), train, query)
    assert np.abs(emp - want).max() > 0.05 * np.abs(want).max()


@pytest.mark.parametrize("fisher", ["empirical", "gauss-newton"])
def test_ekfac_eigenvalues_are_the_diagonal_in_the_kronecker_basis(fisher):
    """On a two-layer MLP applied over a token axis: EK-FAC's corrected eigenvalues equal
    diag(Q^T B Q), B the exact curvature block of the layer (per-sample gradient outer
    products, or the Gauss-Newton from jax.jacobian), Q = Q_A (x) Q_S."""
    model = MLP()
    loss, psl, output, params, train, _ = problem(model, n=30, shape=(2, 4))
    state = at.fit(
        EKFACOptions(fisher=fisher, damping=0.1), loss, psl, params, train, output=output
    )
    flat, unravel = ravel_pytree(params)
    if fisher == "empirical":
        fn = jax.jacobian(lambda t, b: psl(unravel(t), b))  # [1, d]
    else:
        fn = jax.jacobian(lambda t, b: output(unravel(t), b)[0])  # [K, d]
    jac = jax.jit(fn)
    per_sample = [np.asarray(jac(flat, r), np.float64).reshape(-1, flat.size) for r in rows(train)]
    for name in ("d1", "d2"):
        layer = state.fitted["layers"][name]
        # the layer's [in + 1, out] block (kernel rows, then the bias row) of each gradient
        idx = np.arange(flat.size)
        tree = unravel(jnp.asarray(idx, jnp.float32))
        kernel = np.asarray(tree[name]["kernel"], int)
        bias = np.asarray(tree[name]["bias"], int)
        cols = np.concatenate([kernel, bias[None]], 0).ravel()
        blocks = [j[:, cols] for j in per_sample]
        b = sum(x.T @ x for x in blocks) / len(blocks)
        q = np.kron(layer["qa"], layer["qs"])
        np.testing.assert_allclose(
            layer["eigenvalues"].ravel(), np.diag(q.T @ b @ q), rtol=2e-3, atol=1e-6
        )
    # K-FAC's factors: A is the second moment of [x, 1] summed over tokens
    kstate = at.fit(
        KFACOptions(fisher=fisher, damping=0.1), loss, psl, params, train, output=output
    )
    lay = kstate.fitted["layers"]["d1"]
    x = np.concatenate([train["x"], np.ones(train["x"].shape[:-1] + (1,))], -1).reshape(-1, 5)
    a = x.T @ x / len(train["x"])
    la = np.linalg.eigvalsh(a)
    ls = lay["eigenvalues"][-1] / la[-1]
    np.testing.assert_allclose(np.outer(la, ls), lay["eigenvalues"], rtol=1e-3, atol=1e-6)


def test_kfac_refuses_uncovered_parameters(mlp):
    class WithEmbed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="d")(x * self.param("s", nn.initializers.ones, (4,)))

    model = WithEmbed()
    loss, psl, _, params, train, _ = problem(model, out=2)
    with pytest.raises(UserError, match="'s' is not one"):
        at.fit(KFACOptions(), loss, psl, params, train)


# ----------------------------------------------------------------------------- TRAK
def test_trak_full_dimension_equals_gauss_newton_influence():
    """dim = parameter count: the square Gaussian projection is invertible and, undamped,
    TRAK is the exact Gauss-Newton influence g_i GN^-1 g_j; an ensemble of two models is the
    mean of their influences. In float64: an undamped square projection squares the
    Gauss-Newton matrix's condition number."""
    with jax.enable_x64(True):
        model = MLP(hidden=3, out=2)
        loss, psl, output, params, train, query = problem(model, n=60, shape=(2,), out=2)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        train, query = (jax.tree.map(lambda x: x.astype(np.float64), t) for t in (train, query))
        d = ravel_pytree(params)[0].size
        other = jax.tree.map(lambda x: 1.3 * x + 0.1, params)

        def gn_influence(p):
            gn = gauss_newton(output, p, train)
            return grads_loop(psl, p, train) @ np.linalg.solve(gn, grads_loop(psl, p, query).T)

        want = gn_influence(params)
        opts = TRAKOptions(dim=d, batch_size=16)
        got = at.attribute(at.fit(opts, loss, psl, params, train, output=output), train, query)
        close(got, want, 1e-6)
        ens = at.fit(opts, loss, psl, at.Checkpoints([params, other]), train, output=output)
        close(at.attribute(ens, train, query), 0.5 * (want + gn_influence(other)), 1e-6)
        # a smaller projection is an approximation, not the same numbers
        small = at.attribute(
            at.fit(TRAKOptions(dim=d // 2), loss, psl, params, train, output=output),
            train,
            query,
        )
        assert np.abs(small - want).max() > 1e-2 * np.abs(want).max()


def test_unknown_options_are_an_error(mlp):
    loss, psl, _, params, train, _ = mlp
    with pytest.raises(UserError, match="options must be one of"):
        at.fit(ExactOptions(), loss, psl, params, train)


@pytest.mark.parametrize("fisher", ["empirical", "gauss-newton"])
def test_ekfac_on_a_sasrec_block(fisher):
    """EK-FAC on a tiny SASRec's attention output projection and first FFN layer (a
    ParamSubset, the sequence axis as tokens): its corrected eigenvalues are the diagonal, in
    the Kronecker eigenbasis, of the exact curvature: per-sample gradient outer products, or
    J^T H J with J the Jacobian of the logits and H the Hessian of the BCE loss in the logits
    (both by jax.jacobian / jax.hessian). The Gauss-Newton output whitens the logits with the
    square root of that (diagonal) Hessian."""
    from jaxrec.influence import ParamSubset
    from jaxrec.models import sasrec

    model = sasrec.SASRec(n_items=12, hidden=8, blocks=2, heads=2, max_len=5, dropout=0.0)
    params = sasrec.init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n, L = 24, 5
    seq = rng.integers(1, 13, size=(n, L + 1))
    for i, start in enumerate(rng.integers(0, 3, size=n)):
        seq[i, :start] = 0  # left padding
    data = {
        "inputs": seq[:, :-1].astype(np.int32),
        "targets": np.where(seq[:, :-1] > 0, seq[:, 1:], 0).astype(np.int32),
        "negatives": rng.integers(1, 13, size=(n, L)).astype(np.int32),
    }
    _, psl_full = sasrec.make_loss_fns(model)

    def out_full(p, b):
        pos, neg, mask = sasrec.position_logits(model, p, b)
        z = jnp.concatenate([pos, neg], -1)
        m = jnp.concatenate([mask, mask], -1)
        s = jax.nn.sigmoid(z)
        h = s * (1 - s) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1)
        return jnp.where(m, jnp.sqrt(jax.lax.stop_gradient(h)) * z, 0.0)

    sub = ParamSubset(params, r"^(attn_out_1|ffn_1_0)/")
    psl, output = sub.restrict(psl_full), sub.restrict(out_full)
    loss = lambda p, b: jnp.mean(psl(p, b))
    state = at.fit(EKFACOptions(fisher=fisher), loss, psl, sub.params, data, output=output)
    assert set(state.fitted["layers"]) == {"attn_out_1", "ffn_1_0"}
    flat, unravel = ravel_pytree(sub.params)

    def logits(t, b):
        pos, neg, _ = sasrec.position_logits(model, sub.combine(unravel(t)), b)
        return jnp.concatenate([pos, neg], -1)[0]

    def bce(z, b):
        return sasrec.bce_per_sample(z[None, :L], z[None, L:], b["targets"] > 0)[0]

    jz, hz = jax.jit(jax.jacobian(logits)), jax.jit(jax.hessian(bce))
    gfn = jax.jit(jax.grad(lambda t, b: psl(unravel(t), b)[0]))
    curv = []
    for r in rows(data):
        if fisher == "empirical":
            g = np.asarray(gfn(flat, r), np.float64)
            curv.append(np.outer(g, g))
        else:
            j = np.asarray(jz(flat, r), np.float64)
            curv.append(j.T @ np.asarray(hz(np.asarray(logits(flat, r)), r), np.float64) @ j)
    b_all = sum(curv) / n
    tree = unravel(jnp.arange(flat.size, dtype=jnp.float32))
    for name, layer in state.fitted["layers"].items():
        cols = np.concatenate(
            [np.asarray(tree[f"{name}/kernel"]), np.asarray(tree[f"{name}/bias"])[None]], 0
        )
        cols = cols.astype(int).ravel()
        q = np.kron(layer["qa"], layer["qs"])
        want = np.diag(q.T @ b_all[np.ix_(cols, cols)] @ q)
        assert want.max() > 1e-6
        np.testing.assert_allclose(
            layer["eigenvalues"].ravel(), want, rtol=0, atol=2e-3 * want.max()
        )
    query = {k: v[:3] for k, v in data.items()}
    a = at.attribute(state, data, query)
    assert a.shape == (n, 3) and np.all(np.isfinite(a))


def test_sampled_fisher_converges_to_gauss_newton():
    """fisher="sampled" draws e ~ N(0, I) per row: on one Dense layer its S tends to the
    identity (the Gauss-Newton's), so K-FAC's eigenvalues approach the exact ones."""
    loss, psl, output, params, train, _ = problem(Linear(out=2), n=3000)
    gn = np.linalg.eigvalsh(gauss_newton(output, params, train))
    state = at.fit(
        KFACOptions(fisher="sampled", damping=0.1, fit_batch_size=1000),
        loss,
        psl,
        params,
        train,
        output=output,
    )
    got = np.sort(state.fitted["layers"]["lin"]["eigenvalues"].ravel())
    np.testing.assert_allclose(got, np.sort(gn), rtol=0.15)


def test_strata_lists_equal_their_concatenation(mlp):
    """Data given as a list of strata (as lds passes SASRec's length buckets) scores as their
    concatenation, for the estimators with their own fitting passes."""
    loss, psl, output, params, train, query = mlp
    parts = [{k: v[:15] for k, v in train.items()}, {k: v[15:] for k, v in train.items()}]
    for opts in (
        EKFACOptions(fisher="sampled", fit_batch_size=8),
        TRAKOptions(dim=16, damping=0.01, batch_size=8),
        DataInfOptions(grad_batch_size=8),
        at.GradCosOptions(norm_batch_size=8),
    ):
        whole = at.attribute(at.fit(opts, loss, psl, params, train, output=output), train, query)
        split = at.attribute(at.fit(opts, loss, psl, params, parts, output=output), parts, query)
        close(split, whole)


def test_strata_come_back_in_user_order(mlp):
    """Training rows cut into strata in a shuffled order (``Strata(parts, order)``): scores,
    per-row maps and query gradients come back in the data set's order, equal to the scores
    on the unsplit data (grad-dot against the batch-1 gradient loop; EK-FAC against itself on
    the unsplit data)."""
    from jaxrec.influence import Strata, per_sample_map
    from jaxrec.influence.batching import in_order

    loss, psl, _, params, train, query = mlp
    order = np.random.default_rng(3).permutation(40)
    rows_of = [order[:13], order[13:]]
    parts = [jax.tree.map(lambda x, r=r: np.asarray(x)[r], train) for r in rows_of]
    strata = Strata(parts, order)
    want = grads_loop(psl, params, train) @ grads_loop(psl, params, query).T
    got = at.attribute(at.fit(at.GradDotOptions(), loss, psl, params, strata), strata, query)
    close(got, want)
    ek = EKFACOptions(damping=0.1)
    close(
        at.attribute(at.fit(ek, loss, psl, params, strata), strata, query),
        at.attribute(at.fit(ek, loss, psl, params, train), train, query),
    )
    close(per_sample_map(psl, params, strata), np.asarray(psl(params, train)))
    g = at.per_sample_gradients(psl, params, strata)
    flat = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(g), np.float64)
    close(flat, grads_loop(psl, params, train))
    assert in_order(train, "as is") == "as is"
    with pytest.raises(UserError, match="permutation"):
        Strata(parts, order[:-1])
