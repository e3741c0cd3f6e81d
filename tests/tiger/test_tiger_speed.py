"""TIGER speed paths (issue 28, part 3): the exact ones equal the plain computation, the
approximate ones (``autocast``, ``fast_dropout``) stay close to it and are keyed only when set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm_bridge.config import FinetuneConfig
from llm_bridge.tiger import dropout as D
from llm_bridge.tiger import finetune as tft
from llm_bridge.tiger import generate as gen
from llm_bridge.tiger import model as M
from llm_bridge.tiger.evaluate import target_losses
from tests.support import TINY, ft_config, random_codes, random_inputs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny(sizes, n_items=150, n_users=40, seed=0):
    codes = random_codes(n_items, sizes, seed=seed)
    model = M.build_model(sizes, seed, **TINY).eval()
    inputs = random_inputs(n_users, n_items, M.item_tokens(codes, sizes), seed=seed + 1)
    return codes, model, inputs, gen.build_trie(codes, sizes)


# ----------------------------------------------------------------------------- exact
def test_reorder_equals_advanced_indexing():
    g = torch.Generator().manual_seed(0)
    past = [(torch.randn(3, 5, 2, 4, 6, generator=g), torch.randn(3, 5, 2, 4, 6, generator=g))]
    parent = torch.randint(0, 5, (3, 7), generator=g)
    rows = torch.arange(3)[:, None]
    ((k, v),) = gen._reorder(past, parent)
    assert k.shape == (3, 7, 2, 4, 6)
    assert torch.equal(k, past[0][0][rows, parent]) and torch.equal(v, past[0][1][rows, parent])


def test_batched_beam_search_equals_one_user_at_a_time():
    """Users of different lengths in one padded batch get the top-20 each gets alone."""
    sizes = [6, 5, 4, 3]
    _, model, inputs, trie = _tiny(sizes, seed=11)
    one = gen.generate(model, inputs, trie, beams=20, batch_size=1, desc=None)
    many = gen.generate(model, inputs, trie, beams=20, batch_size=16, desc=None)
    assert (one[0] == many[0]).all()
    np.testing.assert_allclose(one[1], many[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- approximate
def test_fast_dropout_law_scale_gradient_and_eval():
    drop = D.FastDropout(0.1)
    q = 6554 / 65536
    x = torch.rand(2_000_000) + 0.5
    torch.manual_seed(0)
    y = drop(x)
    frac = (y == 0).double().mean().item()
    assert abs(frac - q) < 4 * (q * (1 - q) / x.numel()) ** 0.5
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - q))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the torch generator decides the mask
    xg = x[:1000].clone().requires_grad_(True)
    torch.manual_seed(1)
    drop(xg).sum().backward()
    torch.manual_seed(1)
    mask = drop(torch.ones(1000)) != 0
    torch.testing.assert_close(xg.grad, mask / (1 - q))
    assert drop.eval()(x) is x


def test_use_fast_dropout_replaces_every_dropout_and_keeps_eval_outputs():
    sizes = [4, 3, 3, 2]
    model = M.build_model(sizes, 0, **TINY).eval()
    ids = torch.tensor([[2, 7, 9, 1], [3, 1, 0, 0]])
    tgt = torch.tensor([[2, 6, 9, 11, 1]] * 2)
    before = model(input_ids=ids, attention_mask=(ids > 0).long(), labels=tgt).loss
    n = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert n > 0 and D.use_fast_dropout(model) == n
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert sum(isinstance(m, D.FastDropout) for m in model.modules()) == n
    after = model(input_ids=ids, attention_mask=(ids > 0).long(), labels=tgt).loss
    assert torch.equal(before, after)


def _steps(sizes, autocast: str, n_steps: int = 3):
    """Parameters and mean loss after ``n_steps`` AdamW steps (lr 1e-2) of the tiny T5."""
    _codes, model, inputs, _trie = _tiny(sizes, n_items=60, n_users=24 * n_steps, seed=21)
    rng = np.random.default_rng(0)
    targets = np.concatenate([rng.integers(2, 14, (len(inputs), 4)), np.ones((len(inputs), 1))], 1)
    for m in model.modules():  # no dropout: compare the arithmetic only
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = FinetuneConfig(lr=1e-2, weight_decay=0.01, schedule="constant")
    opt, sched = tft.make_optimizer(model, cfg, n_steps)
    loss, steps = tft.train_epoch(
        model, inputs, targets.astype(np.int64), np.arange(len(inputs)), opt, sched, 24, 1, autocast
    )
    assert steps == n_steps
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach(), loss


def test_bf16_autocast_training_follows_float32():
    """A stale bfloat16 copy of the parameters (autocast held across optimizer steps) would
    leave the later steps' gradients at the first step's parameters: measured, its mean loss
    is 10% above float32's and its parameters 0.38x the distance moved away (per-forward
    autocast: 0.04% and 0.10x; AdamW turns rounding of tiny gradients into whole steps)."""
    sizes = [4, 3, 3, 2]
    p32, l32 = _steps(sizes, "")
    p16, l16 = _steps(sizes, "bf16")
    assert abs(l16 - l32) < 0.02 * l32
    start = torch.nn.utils.parameters_to_vector(M.build_model(sizes, 21, **TINY).parameters())
    moved = (p32 - start.detach()).norm()
    assert (p16 - p32).norm() < 0.2 * moved


def test_bf16_autocast_beam_search_is_close():
    sizes = [6, 5, 4, 3]
    codes, model, inputs, trie = _tiny(sizes, seed=31)
    a_items, a_scores = gen.generate(model, inputs, trie, beams=20, batch_size=8, desc=None)
    b_items, b_scores = gen.generate(
        model, inputs, trie, beams=20, batch_size=8, desc=None, autocast="bf16"
    )
    assert b_scores.dtype == np.float32 and np.isfinite(b_scores).all()
    overlap = np.mean([len(set(x) & set(y)) / 20 for x, y in zip(a_items, b_items)])
    assert overlap > 0.9
    assert np.abs(a_scores[:, 0] - b_scores[:, 0]).max() < 0.1
    tokens = M.item_tokens(codes, sizes)
    first = np.array([M.target_tokens(i, tokens) for i in range(1, len(inputs) + 1)])
    exact = target_losses(model, inputs, first)
    np.testing.assert_allclose(target_losses(model, inputs, first, autocast="bf16"), exact, 0.02)


def test_speed_options_run_key_and_resume_only_when_set(syn, tmp_path):
    from jaxrec.pipeline import key_options

    root, path, *_ = syn
    out = tmp_path / "model"
    fast = {"autocast": "bf16", "fast_dropout": True}
    assert tft.run(ft_config(root, path, out, epochs=2, **fast)) == 0
    record = json.loads((out / "train_record.json").read_text())
    assert record["settings"]["autocast"] == "bf16" and record["settings"]["fast_dropout"]
    assert np.isfinite([e["valid_loss"] for e in record["epochs"]]).all()
    assert record["epochs"][1]["train_loss"] < record["epochs"][0]["train_loss"]
    with pytest.raises(Exception, match="other settings"):  # a fast checkpoint is not a plain one
        tft.run(ft_config(root, path, out, epochs=2))
    plain = key_options("finetune", {"backend": "tiger"})
    assert "autocast" not in plain and "fast_dropout" not in plain
    assert key_options("finetune", {"backend": "tiger", **fast}).items() >= fast.items()
    assert "autocast" not in key_options("evaluate", {"backend": "tiger"})
    with pytest.raises(Exception, match="autocast"):
        tft.run(ft_config(root, path, tmp_path / "bad", autocast="fp8"))
