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


def _chunk_cost(chunks, lengths, overhead=tft.CHUNK_OVERHEAD, row_tokens=tft.ROW_TOKENS):
    return sum(overhead + len(c) * (max(lengths[r] for r in c) + row_tokens) for c in chunks)


def test_cost_chunks_are_the_cheapest_cut_of_the_sorted_rows():
    """Against every one of the 2^(n-1) cuts of the length-sorted rows (brute force)."""
    import itertools

    rng = np.random.default_rng(3)
    inputs = [[2] * int(n) for n in rng.integers(1, 82, 11)]
    rows = rng.permutation(len(inputs))
    lengths = {r: len(inputs[r]) for r in rows}
    chunks = tft.cost_chunks(rows, inputs, max_tokens=400)
    assert sorted(np.concatenate(chunks).tolist()) == sorted(rows.tolist())
    assert all(len(c) == 1 or len(c) * max(lengths[r] for r in c) <= 400 for c in chunks)
    srt = rows[np.argsort([lengths[r] for r in rows], kind="stable")]
    best = np.inf
    for mask in itertools.product([0, 1], repeat=len(srt) - 1):
        bounds = [0, *[i + 1 for i, m in enumerate(mask) if m], len(srt)]
        cut = [srt[a:b] for a, b in zip(bounds, bounds[1:])]
        if all(len(c) == 1 or len(c) * max(lengths[r] for r in c) <= 400 for c in cut):
            best = min(best, _chunk_cost(cut, lengths))
    assert _chunk_cost(chunks, lengths) == best
    greedy = tft.length_chunks(rows, inputs, 400)
    assert _chunk_cost(chunks, lengths) <= _chunk_cost(greedy, lengths)


def test_cost_chunks_leave_every_sample_loss_and_the_gradient_of_the_batch():
    """Each user's loss in its chunk equals its loss in the whole padded batch (1e-5), and one
    SGD step (lr 1) of ``train_epoch`` over the chunks moves the parameters by the gradient of
    the batch's mean loss, computed as one padded batch (no dropout)."""
    sizes = [6, 5, 4, 3]
    codes = random_codes(150, sizes, seed=41)
    tokens = M.item_tokens(codes, sizes)
    rng = np.random.default_rng(41)
    inputs = [
        M.history_input(rng.integers(1, 151, rng.integers(0, 21)), tokens, 20) for _ in range(48)
    ]
    targets = np.array([M.target_tokens(i, tokens) for i in rng.integers(1, 151, 48)])
    model = M.build_model(sizes, 41, **{**TINY, "dropout_rate": 0.0})
    batch = np.arange(48)
    chunks = tft.cost_chunks(batch, inputs, overhead=20, row_tokens=2, max_tokens=200)
    assert len(chunks) > 2 and max(len(x) for x in inputs) > 2 * min(len(x) for x in inputs)

    def per_sample(rows):
        ids, mask, tgt = tft._tensors(inputs, targets, rows, "cpu")
        logits = model(input_ids=ids, attention_mask=mask, labels=tgt).logits
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tgt.flatten(), reduction="none"
        )
        return ce.view(tgt.shape).mean(1)

    with torch.no_grad():
        whole = per_sample(batch)
        for rows in chunks:
            np.testing.assert_allclose(per_sample(rows), whole[rows], rtol=1e-5, atol=1e-5)
    model.train()
    model.zero_grad()
    per_sample(batch).mean().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    chunked = tft.CHUNKINGS["cost"]
    try:  # the test's cost constants, so that the batch is cut in several chunks
        tft.CHUNKINGS["cost"] = lambda r, i: chunked(r, i, 20, 2, 200)
        loss, steps = tft.train_epoch(model, inputs, targets, batch, opt, sched, 48, 1, "", "cost")
    finally:
        tft.CHUNKINGS["cost"] = chunked
    assert steps == 1 and abs(loss - float(whole.mean())) < 1e-5
    moved = before - torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    np.testing.assert_allclose(moved, grad, rtol=1e-4, atol=1e-6)


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
    assert "chunking" not in plain
    assert key_options("finetune", {"backend": "tiger", "chunking": "cost"})["chunking"] == "cost"
    with pytest.raises(Exception, match="autocast"):
        tft.run(ft_config(root, path, tmp_path / "bad", autocast="fp8"))
