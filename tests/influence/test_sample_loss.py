"""The per-user sample loss that scores a user (``influence.sample_loss``, issue 23) against a
PyTorch transcription of the paper code's ``FineTrainer.get_sample_loss`` ->
``Trainer.cross_entropy`` (github Linxyhaha/DEALRec ``code/prune/trainers.py``) on the same
weights and negatives, and the factor ``n_i / c`` between it and the training-loss form."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.flatten_util import ravel_pytree

from jaxrec.config import InfluenceConfig
from jaxrec.influence.dealrec import dealrec_scores
from jaxrec.models import sample_loss, sasrec
from tests.support import official_batch, official_model, torch_from_flax

BLOCK = r"^attn_out_1/bias$"  # 16 values: an exact Hessian by hand


def get_sample_loss(m, batch, r):
    """``FineTrainer.get_sample_loss(idx)``: the sample alone (``unsqueeze(0)``), eval mode,
    ``cross_entropy`` of its sequence output (the transcription's, 1e-24 eps included)."""
    one = {k: torch.tensor(batch[k][r : r + 1], dtype=torch.long) for k in batch}
    return m.cross_entropy(m.finetune(one["inputs"]), one["targets"], one["negatives"])


def torch_grad(m, loss) -> dict:
    """``{flax path: gradient}`` of ``loss`` w.r.t. the transcription's parameters, laid out
    as the Flax tree (Dense kernels transposed)."""
    m.zero_grad()
    loss.backward()
    att = m.layer[1].attention
    return {
        "item_emb": m.item_embeddings.weight.grad.numpy().copy(),
        "attn_out_1/kernel": att.dense.weight.grad.numpy().T.copy(),
        "attn_out_1/bias": att.dense.bias.grad.numpy().copy(),
        "query_0/kernel": m.layer[0].attention.query.weight.grad.numpy().T.copy(),
        "ffn_2_1/kernel": m.layer[1].intermediate.conv1d_2.weight.grad.numpy()[:, :, 0].T.copy(),
        "emb_ln/scale": m.LayerNorm.weight.grad.numpy().copy(),
    }


def flax_grad(g) -> dict:
    return {
        "item_emb": g["item_emb"]["embedding"],
        "attn_out_1/kernel": g["attn_out_1"]["kernel"],
        "attn_out_1/bias": g["attn_out_1"]["bias"],
        "query_0/kernel": g["query_0"]["kernel"],
        "ffn_2_1/kernel": g["ffn_2_1"]["kernel"],
        "emb_ln/scale": g["emb_ln"]["scale"],
    }


def test_per_user_gradients_equal_the_official_get_sample_loss():
    """Per-sample gradients of ``jaxrec.models.sample_loss`` (row i of a batch of six) equal
    the gradients of the official ``get_sample_loss(i)`` (torch, float64) to 1e-5 relative,
    for every user with targets and every compared parameter (item table, the paper's block,
    a first-block query, an FFN, the embedding LayerNorm); float64 on both sides."""
    model, params = official_model()
    batch, _ = official_batch()
    m = torch_from_flax(params)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        per_user = sample_loss(model)
        rows = [r for r in range(len(batch["inputs"])) if (batch["targets"][r] > 0).any()]
        assert len(rows) == 5
        for r in rows:
            ref = get_sample_loss(m, batch, r)
            value, g = jax.value_and_grad(lambda p: per_user(p, batch)[r])(p64)
            np.testing.assert_allclose(float(value), ref.item(), rtol=1e-10)
            want, got = torch_grad(m, ref), flax_grad(g)
            for name in want:
                err = np.linalg.norm(np.asarray(got[name]) - want[name])
                assert err <= 1e-5 * np.linalg.norm(want[name]), (r, name, err)
        # the user without targets: loss 0, gradient 0 (the official 0 / (0 + 1e-24))
        value, g = jax.value_and_grad(lambda p: per_user(p, batch)[0])(p64)
        assert float(value) == 0.0 and not np.any(ravel_pytree(g)[0])


def test_training_and_per_user_forms_differ_by_n_i_over_c():
    """Hand-worked: the batch's users have n = 0, 1, 4, 8, 2, 6 target positions, so the
    training loss's constant is c = 21 / 6 = 3.5 and user i's training-form loss (position
    weighting: its summed position terms over c) is n_i / c = 0, 2/7, 8/7, 16/7, 4/7, 12/7
    times its per-user loss (the mean over its positions). ``dealrec_scores`` keeps ``v`` and
    ``H`` of the training loss under both forms, so the scores differ by exactly that factor;
    and the per-user score is ``g_i . 25 (H + 0.25 I)^-1 v / n^2`` with ``g_i`` the official
    ``get_sample_loss`` gradient and ``H``, ``v`` built by hand."""
    model, params = official_model()
    batch, _ = official_batch()
    n_i = (batch["targets"] > 0).sum(1)
    assert n_i.tolist() == [0, 1, 4, 8, 2, 6]
    c = sasrec.positions_per_sample(batch["targets"])
    assert c == 3.5
    factor = np.array([0, 2, 8, 16, 4, 12]) / 7
    loss, per_sample = sasrec.make_loss_fns(model, "position", c)
    per_user = sample_loss(model)
    train_rows = np.asarray(per_sample(params, batch))
    user_rows = np.asarray(per_user(params, batch))
    np.testing.assert_allclose(train_rows, factor * user_rows, rtol=1e-6)

    common = dict(params=BLOCK, solver="exact", negative_draws=1)
    data = {k: np.asarray(v) for k, v in batch.items()}
    scores = {}
    for form in ("per-user", "training"):
        cfg = InfluenceConfig(sample_loss=form, **common)
        scores[form], info = dealrec_scores(loss, per_sample, per_user, params, data, cfg)
        assert info["solver"]["sample_loss"] == form and info["n_params"] == 16
    np.testing.assert_allclose(scores["training"], factor * scores["per-user"], rtol=1e-5)
    assert abs(scores["per-user"][3]) > 0 and scores["training"][0] == scores["per-user"][0] == 0

    # by hand: v and H of the training loss on the block, g_i from the torch transcription
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)

        def on_block(b):
            q = {**p64, "attn_out_1": {**p64["attn_out_1"], "bias": b}}
            return q

        b0 = p64["attn_out_1"]["bias"]
        v = np.asarray(jax.grad(lambda b: loss(on_block(b), batch))(b0))
        h = np.asarray(jax.hessian(lambda b: loss(on_block(b), batch))(b0))
    u = 25.0 * np.linalg.solve(h + 0.25 * np.eye(16), v)  # the dealrec convention
    m = torch_from_flax(params)
    want = np.zeros(6)
    for r in range(1, 6):
        want[r] = torch_grad(m, get_sample_loss(m, batch, r))["attn_out_1/bias"] @ u / 6**2
    np.testing.assert_allclose(scores["per-user"], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
