"""TIGER effort (paper Eq. 12 over all T5 parameters at init): exact batched per-sample
gradient norms equal a batch-1 autograd loop; the sharded, resumable command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset, load_scores
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from llm_bridge.config import EffortConfig
from llm_bridge.tiger import effort as eff
from llm_bridge.tiger import model as M
from tests.support import TINY, random_codes, random_inputs, write_codes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _batch(sizes, n_items, n, seed):
    codes = random_codes(n_items, sizes, seed=seed)
    tokens = M.item_tokens(codes, sizes)
    inputs = random_inputs(n, n_items, tokens, seed=seed)
    rng = np.random.default_rng(seed)
    items = rng.integers(1, n_items + 1, n)
    targets = np.array([M.target_tokens(i, tokens) for i in items])
    return inputs, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_effort_equals_batch1_loop(dtype):
    """Padded batches of mixed lengths (empty histories too), a tied output layer, both
    relative-position tables: every parameter of a 2+2-layer T5."""
    sizes = [5, 4, 4, 3]
    inputs, targets = _batch(sizes, 60, 24, seed=1)
    sizes_t5 = {**TINY, "num_layers": 2}
    model = M.build_model(sizes, 7, **sizes_t5).to(dtype).eval()
    batched = eff.score_samples(model, inputs, targets, batch_size=8)
    loop = eff.loop_grad_norms(model, inputs, targets)
    assert (loop > 0).all()
    np.testing.assert_allclose(batched, loop, rtol=1e-4 if dtype == torch.float32 else 1e-6)


def test_vmap_reference_agrees():
    sizes = [4, 4, 3, 2]
    inputs, targets = _batch(sizes, 40, 6, seed=2)
    model = M.build_model(sizes, 3, **TINY).eval()
    ids, mask = M.pad_inputs(inputs)
    tgt = torch.as_tensor(targets)
    a = eff.grad_norms(model, ids, mask, tgt)
    b = eff.vmap_grad_norms(M.params_of(model), M.Spec.of(model.config), ids, mask, tgt)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


def test_effort_does_not_depend_on_the_batch():
    sizes = [4, 4, 3, 2]
    inputs, targets = _batch(sizes, 40, 10, seed=3)
    model = M.build_model(sizes, 0, **TINY).eval()
    a = eff.score_samples(model, inputs, targets, batch_size=10)
    b = eff.score_samples(model, inputs, targets, batch_size=3)
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiger_effort")
    path = make_synthetic(root / "data", n_users=40, n_items=30, n_clusters=3, max_len=6, seed=5)
    ds = load_dataset(path)
    sizes = [4, 3, 3, 2]
    write_codes(root / "codes.npy", ds, random_codes(ds.n_items, sizes, seed=5), sizes)
    return root, path, ds


def _cfg(root, path, out, **kw):
    base = {
        "data": str(path),
        "backend": "tiger",
        "semantic_ids": str(root / "codes.npy"),
        "out": str(out),
        "batch_size": 16,
        "shard_size": 16,
        "device": "cpu",
        "seed": 0,
    }
    return EffortConfig(**{**base, **kw})


def test_effort_command_in_parts_equals_one_run(syn, tmp_path):
    root, path, ds = syn
    whole, parts = tmp_path / "whole.npy", tmp_path / "parts.npy"
    assert eff.run(_cfg(root, path, whole)) == 0
    scores, manifest = load_scores(whole, kind="effort", dataset=ds.fingerprint())
    assert scores.shape == (ds.n_users,) and scores.dtype == np.float32 and (scores > 0).all()
    assert manifest["options"]["backend"] == "tiger"
    assert manifest["loss"] == eff.LOSS and manifest["loss"].startswith("TIGER")
    assert manifest["options"]["settings"]["max_history"] == 20
    assert eff.run(_cfg(root, path, parts, users="0:20")) == 0
    assert not parts.exists()  # rows 20.. missing: nothing merged
    assert eff.run(_cfg(root, path, parts, users="20:", resume=True)) == 0
    np.testing.assert_allclose(load_scores(parts)[0], scores, rtol=1e-6)
    other = tmp_path / "seed1.npy"
    assert eff.run(_cfg(root, path, other, seed=1)) == 0
    assert not np.allclose(load_scores(other)[0], scores)  # another init state
    short = tmp_path / "short.npy"  # a shorter history is another sample: other scores
    assert eff.run(_cfg(root, path, short, max_history=1)) == 0
    assert not np.allclose(load_scores(short)[0], scores)


def test_effort_codes_of_another_dataset_fail_before_writing(syn, tmp_path):
    _root, path, _ds = syn
    other = load_dataset(make_synthetic(tmp_path / "other", n_users=20, n_items=30, seed=8))
    write_codes(tmp_path / "codes.npy", other, random_codes(30, [4, 3, 3, 2]), [4, 3, 3, 2])
    out = tmp_path / "e.npy"
    with pytest.raises(UserError) as err:
        eff.run(_cfg(tmp_path, path, out))
    assert "\n" not in str(err.value)
    assert not out.exists() and not eff.shard_folder(out).exists()
