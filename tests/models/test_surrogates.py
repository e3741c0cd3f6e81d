"""The other surrogates (GRU4Rec, BERT4Rec, DCRec) under SASRec's contract: per-sample losses
that do not depend on batch-mates, exact width cuts, reproducible training data,
``sample_scores`` equal to a per-sample ``jax.grad`` loop, learning, resume, and the
``train-surrogate --model`` / ``influence`` commands end to end."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxrec.cli import main as cli
from jaxrec.config import SurrogateConfig
from jaxrec.data import load_dataset, load_scores, training_arrays
from jaxrec.data.buckets import KEYS, target_lengths, width_strata
from jaxrec.influence import sample_scores
from jaxrec.models import spec
from jaxrec.train import load_surrogate, train

NEW = ["gru4rec", "bert4rec", "dcrec"]
N_ITEMS = 30


def raw_arrays(b=10, width=12, seed=0, n_items=N_ITEMS):
    """Next-item arrays (as ``training_arrays``) of ``b`` random users, some empty."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=b)
    lengths[:2] = (0, 1)
    inputs = np.zeros((b, width), np.int32)
    targets = np.zeros((b, width), np.int32)
    for r, n in enumerate(lengths):
        if n:
            seq = rng.integers(1, n_items + 1, size=n + 1)
            inputs[r, width - n :], targets[r, width - n :] = seq[:-1], seq[1:]
    return {"inputs": inputs, "targets": targets, "index": np.arange(b, dtype=np.int32)}


def seqs(arrays):
    """Each row's items (``sequences=`` of the training data: sequence negatives avoid them)."""
    return [
        np.unique(np.r_[i[i > 0], t[t > 0]]) for i, t in zip(arrays["inputs"], arrays["targets"])
    ]


def graph_data():
    """A stand-in dataset (only ``train`` is read) for DCRec's item graphs."""
    a = raw_arrays(b=40, seed=11)
    seqs = [np.r_[i[i > 0], t[-1:]] for i, t in zip(a["inputs"], a["targets"]) if t[-1]]
    return SimpleNamespace(train=seqs)


def small(name, arrays=None):
    cfg = SurrogateConfig(model=name, hidden=16, blocks=2, heads=2, max_len=12, dropout=0.3)
    s = spec(name)
    arrays = raw_arrays() if arrays is None else arrays
    model = s.build(cfg, N_ITEMS, graph_data())
    params = s.init_params(model, jax.random.PRNGKey(0))
    data = s.training_data(arrays, 0, 0, N_ITEMS, cfg, seqs(arrays))
    batch = {k: jnp.asarray(data[k]) for k in KEYS}
    return s, cfg, model, params, batch


@pytest.mark.parametrize("name", NEW)
def test_cutting_padding_columns_is_exact(name):
    s, _, model, params, batch = small(name)
    _, per_sample = s.make_loss_fns(model)
    full = np.asarray(per_sample(params, batch))
    width = int(target_lengths(batch).max())  # the tightest width: the longest row fills it
    assert width < batch["inputs"].shape[1]
    cut = per_sample(params, {k: v[:, -width:] for k, v in batch.items()})
    np.testing.assert_allclose(full, cut, rtol=1e-5, atol=1e-6)
    assert np.all(full[:1] == 0.0) and np.all(full[2:] > 0)  # no sample: loss 0


@pytest.mark.parametrize("name", NEW)
def test_sample_loss_does_not_depend_on_batch_mates(name):
    s, _, model, params, batch = small(name)
    loss, per_sample = s.make_loss_fns(model)
    per = np.asarray(per_sample(params, batch))
    np.testing.assert_allclose(loss(params, batch), per.mean(), rtol=1e-6)
    for i in (2, 5):
        alone = per_sample(params, {k: v[i : i + 1] for k, v in batch.items()})
        np.testing.assert_allclose(alone[0], per[i], rtol=1e-5)
    # other batch-mates (another random batch around row 5) leave row 5's loss unchanged
    _, _, _, _, other = small(name, raw_arrays(seed=7))
    mixed = {k: other[k].at[5].set(batch[k][5]) for k in KEYS}
    np.testing.assert_allclose(per_sample(params, mixed)[5], per[5], rtol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_training_data_reproducible_per_sample(name):
    s, cfg, *_ = small(name)
    arrays = raw_arrays(b=40, seed=3)
    a = s.training_data(arrays, 3, 2, N_ITEMS, cfg, seqs(arrays))
    part = {k: v[10:20] for k, v in arrays.items()}
    b = s.training_data(part, 3, 2, N_ITEMS, cfg, seqs(arrays))
    for k in KEYS:
        np.testing.assert_array_equal(a[k][10:20], b[k])  # depends on (seed, index, epoch)
    c = s.training_data(arrays, 3, 3, N_ITEMS, cfg, seqs(arrays))
    assert any(not np.array_equal(a[k], c[k]) for k in KEYS)  # a new draw each epoch


def test_bert4rec_cloze_masks():
    from jaxrec.models.bert4rec import n_masks

    s, cfg, *_ = small("bert4rec")
    arrays = raw_arrays(b=200, seed=5)
    d = s.training_data(arrays, 0, 0, N_ITEMS, cfg, seqs(arrays))
    n = (arrays["targets"] > 0).sum(1)
    seq = np.concatenate([arrays["inputs"][:, 1:], arrays["targets"][:, -1:]], 1)
    masked = d["inputs"] == N_ITEMS + 1
    # the whole train sequence, round(0.2 n) >= 1 items masked (n + 1 items), labels = originals
    np.testing.assert_array_equal(masked.sum(1), np.where(n > 0, n_masks(n + 1, 0.2, 12), 0))
    np.testing.assert_array_equal(d["targets"][masked], seq[masked])
    np.testing.assert_array_equal(d["inputs"][~masked], np.where(n[:, None] > 0, seq, 0)[~masked])
    assert (d["targets"][~masked] == 0).all() and (d["negatives"] == 0).all()
    assert n_masks(np.array([0, 1, 2, 7, 8, 50, 100]), 0.2, 50).tolist() == [0, 1, 1, 1, 2, 10, 10]


@pytest.mark.parametrize("name", NEW)
def test_sample_scores_equal_per_sample_grad_loop(name):
    s, _, model, params, batch = small(name)
    _, per_sample = s.make_loss_fns(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
    u = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    flat_u = ravel_pytree(u)[0]
    grad_one = jax.jit(jax.grad(lambda p, one: per_sample(p, one)[0]))  # one sample at a time
    want = []
    for i in range(batch["inputs"].shape[0]):
        g = grad_one(params, {k: v[i : i + 1] for k, v in batch.items()})
        want.append(float(ravel_pytree(g)[0] @ flat_u))
    for bs in (3, 16):
        got = sample_scores(per_sample, params, batch, u, batch_size=bs)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want).max() > 0


@pytest.fixture(scope="module", params=NEW)
def trained(request, tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp(request.param)
    cfg = SurrogateConfig(
        model=request.param,
        data=str(synthetic_dir),
        out=str(out),
        epochs=25,
        batch_size=64,
        patience=25,
        dropout=0.2,
        seed=0,
    )
    return request.param, out, train(cfg, progress=False)


def test_synthetic_structure_is_learned(trained):
    name, run, metrics = trained
    # 120 items, ~10 masked: random Recall@10 is about 0.09
    assert metrics["test"]["recall@10"] > 0.2, (name, metrics)
    assert json.loads((run / "config.json").read_text())["model"] == name


def test_load_surrogate_and_influence_command(trained, tmp_path, capsys):
    name, run, _ = trained
    sur = load_surrogate(run)
    assert type(sur.model).__module__ == f"jaxrec.models.{name}"
    order, parts = width_strata(sur.data, sur.config.max_len)
    cut = np.concatenate([np.asarray(sur.per_sample_loss(sur.params, p)) for p in parts])
    full = sur.per_sample_loss(sur.params, {k: sur.data[k] for k in KEYS})
    np.testing.assert_allclose(cut, np.asarray(full)[order], atol=1e-5)
    ds = sur.dataset
    for score, flags in [
        ("influence", ["--steps", "100", "--params", "^item_emb"]),
        ("grand", []),
        ("el2n", []),
        ("representation", []),
    ]:
        out = tmp_path / f"{score}.npy"
        argv = ["influence", "--run", str(run), "--out", str(out), "--score", score, *flags]
        assert cli([*argv, "--compile-cache", ""]) == 0
        s, _ = load_scores(out, kind=score, dataset=ds.fingerprint())
        assert s.shape[0] == ds.n_users and np.isfinite(s).all() and np.abs(s).max() > 0
    capsys.readouterr()
    assert cli(["evaluate-surrogate", "--run", str(run), "--splits", "test"]) == 0
    assert "recall@20" in json.loads(capsys.readouterr().out)["test"]


@pytest.mark.parametrize("name", NEW)
def test_resume_after_a_kill(name, tmp_path, synthetic_dir, capsys):
    """A 3-epoch run killed after epoch 2 (simulated: the files a 2-epoch run leaves, with the
    run's config saying 3 epochs and no metrics yet) continues with epoch 3 from the saved
    state instead of starting again."""
    run = tmp_path / "r"
    cfg = SurrogateConfig(
        model=name, data=str(synthetic_dir), out=str(run), epochs=2, batch_size=64
    )
    train(cfg, progress=False)
    state = json.loads((run / "train_state.json").read_text())
    state["config"]["epochs"] = 3
    (run / "train_state.json").write_text(json.dumps(state))
    (run / "metrics.json").unlink()
    capsys.readouterr()
    cfg.epochs = 3
    m = train(cfg, progress=False)
    assert "resuming" in capsys.readouterr().err
    history = json.loads((run / "train_state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and m["epochs_run"] == 3
    assert history[:2] == state["history"]  # epochs 1-2 kept as they were, not rerun
    assert history[2]["loss"] < history[0]["loss"]


def test_cli_model_choice(tmp_path, synthetic_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train-surrogate", "--model", "caser"])
    assert e.value.code == 2 and "invalid choice: 'caser'" in capsys.readouterr().err
    out = tmp_path / "run"
    argv = ["train-surrogate", "--data", str(synthetic_dir), "--out", str(out)]
    assert cli([*argv, "--model", "gru4rec", "--epochs", "1", "--batch-size", "128"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "gru4rec"


def test_old_runs_without_model_key_load_as_sasrec(trained_run, tmp_path):
    """Runs made before ``model`` existed have no such key in config.json: they are SASRec."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(trained_run[0], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg.pop("model", None)
    (run / "config.json").write_text(json.dumps(cfg))
    sur = load_surrogate(run)
    assert type(sur.model).__name__ == "SASRec"
    ds = load_dataset(sur.config.data)
    assert sur.data["inputs"].shape == training_arrays(ds)["inputs"].shape


def test_dcrec_graphs_as_the_authors_build_them():
    """Hand-worked: sequences [1 2 3] and [2 3]. Transition counts 1-2: 1, 2-3: 2, self-loops 1,
    normalised D^-1/2 A D^-1/2 (degrees 2, 4, 3); DGL adds self-loops and GraphConv("both")
    divides by sqrt(out_deg(src) in_deg(dst)) edge counts (3, 4, 3). Co-interaction: binary
    user-item cosine, top sim_k + 1 per item (itself first), row-normalised."""
    from jaxrec.models.dcrec import build_graphs

    g = build_graphs([np.array([1, 2, 3]), np.array([2, 3])], 3, sim_k=1)
    src, dst, coef = g.adj
    edge = {(int(a), int(b)): float(c) for a, b, c in zip(src, dst, coef) if a != b}
    assert set(edge) == {(1, 2), (2, 1), (2, 3), (3, 2)}
    assert edge[(1, 2)] == pytest.approx((1 / np.sqrt(2 * 4)) / np.sqrt(3 * 4), rel=1e-6)
    assert edge[(2, 3)] == pytest.approx((2 / np.sqrt(4 * 3)) / np.sqrt(4 * 3), rel=1e-6)
    src, dst, coef = g.sim
    # item 1: itself (cos 1) and item 2 (cos 1/sqrt 2; ties with 3, the smaller id wins)
    row1 = {int(b): float(c) for a, b, c in zip(src, dst, coef) if a == 1}
    w = np.array([1.0, 1 / np.sqrt(2)]) / (1 + 1 / np.sqrt(2))
    assert set(row1) == {1, 2}
    # edges 1->{1,2}, 2->{2,3}, 3->{2,3}, plus DGL's self-loops: out_deg(1) = 3, in_deg(2) = 4
    in_deg, out_deg = np.bincount(dst, minlength=4), np.bincount(src, minlength=4)
    assert out_deg[1] == 3 and in_deg[1] == 2 and in_deg[2] == 4
    assert row1[2] == pytest.approx(w[1] / np.sqrt(out_deg[1] * in_deg[2]), rel=1e-6)
    assert g.neighbours[2, :2].tolist() == [3, 1]  # strongest transition first
