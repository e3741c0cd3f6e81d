"""The ``arch="official"`` SASRec against a PyTorch transcription of the paper's code (github
Linxyhaha/DEALRec ``code/prune/modules.py``, ``models.py``, ``trainers.py``; in tests/support.py)
on the same weights; ``negatives="sequence"`` against the official rule; the preset of the scored
block."""

import jax
import numpy as np
import pytest
import torch

from jaxrec.influence.params import ParamSubset
from jaxrec.models import sasrec
from tests.support import HIDDEN, MAX_LEN, N_ITEMS, official_batch, official_model, torch_from_flax


# ----------------------------------------------------------------------------- tests
def test_official_forward_equals_the_torch_transcription():
    model, params = official_model()
    batch, _ = official_batch()
    ref = torch_from_flax(params).finetune(torch.tensor(batch["inputs"], dtype=torch.long))
    ours = np.asarray(model.apply({"params": params}, batch["inputs"], True))
    real = batch["inputs"] > 0
    assert real.sum() > 10
    np.testing.assert_allclose(ours[real], ref.detach().numpy()[real], rtol=1e-5, atol=1e-5)
    # cut to a narrower width: the same numbers (positions count from the right)
    cut = np.asarray(model.apply({"params": params}, batch["inputs"][:, -8:], True))
    np.testing.assert_allclose(cut[real[:, -8:]], ours[:, -8:][real[:, -8:]], atol=1e-5)


def test_official_loss_and_gradient_equal_the_torch_cross_entropy():
    model, params = official_model()
    batch, _ = official_batch()
    m = torch_from_flax(params)
    as_t = lambda k: torch.tensor(batch[k], dtype=torch.long)  # noqa: E731
    ref = m.cross_entropy(m.finetune(as_t("inputs")), as_t("targets"), as_t("negatives"))
    ref.backward()
    # position weighting with the batch's own positions per sample: the official batch loss
    positions = sasrec.positions_per_sample(batch["targets"])
    loss, per_sample = sasrec.make_loss_fns(model, "position", positions)
    value, grads = jax.value_and_grad(loss)(params, batch)
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
    dense = m.layer[1].attention.dense.weight.grad.numpy().T  # the paper's scored block
    np.testing.assert_allclose(grads["attn_out_1"]["kernel"], dense, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        grads["item_emb"]["embedding"], m.item_embeddings.weight.grad.numpy(), atol=1e-6
    )
    # sample weighting: each row's loss is the official loss of that row alone
    _, per_row = sasrec.make_loss_fns(model, "sample")
    rows = np.asarray(per_row(params, batch))
    for r in np.flatnonzero((batch["targets"] > 0).any(1)):
        one = lambda k: as_t(k)[r : r + 1]  # noqa: E731
        alone = m.cross_entropy(m.finetune(one("inputs")), one("targets"), one("negatives"))
        np.testing.assert_allclose(rows[r], alone.item(), rtol=1e-5)
    # position weighting is per sample too: independent of the batch-mates, any width
    per = np.asarray(per_sample(params, batch))
    alone = per_sample(params, {k: v[3:4, -9:] for k, v in batch.items()})
    np.testing.assert_allclose(alone[0], per[3], rtol=1e-5)


def test_official_initialisation_follows_init_weights():
    model = sasrec.SASRec(n_items=2000, hidden=64, max_len=50, arch="official")
    p = sasrec.init_params(model, jax.random.PRNGKey(0))
    assert abs(float(np.std(p["item_emb"]["embedding"])) - 0.02) < 1e-3
    assert abs(float(np.std(p["attn_out_1"]["kernel"])) - 0.02) < 2e-3
    assert not np.any(p["query_0"]["bias"]) and np.all(p["attn_ln_0"]["scale"] == 1)
    bound = 1 / 8  # nn.Conv1d(64, 64, 1) default: U(-1/sqrt(64), 1/sqrt(64))
    for leaf in (p["ffn_1_0"]["kernel"], p["ffn_2_1"]["bias"]):
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound


def test_sequence_negatives_never_hit_the_sequence_and_are_uniform():
    rng = np.random.default_rng(1)
    n_items, b, width = 40, 300, 10
    seqs = [rng.integers(1, n_items + 1, size=rng.integers(1, 30)) for _ in range(b)]
    targets = np.zeros((b, width), np.int32)
    for r, s in enumerate(seqs):
        t = s[1:][-width:]
        targets[r, width - len(t) :] = t
    neg = sasrec.sequence_negatives(5, np.arange(b), 2, targets, n_items, seqs)
    assert np.all(neg[targets == 0] == 0) and np.all(neg[targets > 0] >= 1)
    assert neg.max() <= n_items
    for r, s in enumerate(seqs):
        assert not np.isin(neg[r][targets[r] > 0], s).any(), r
    # reproducible per sample, independent of the other rows; new draws each epoch
    part = sasrec.sequence_negatives(
        5, np.arange(100, 120), 2, targets[100:120], n_items, seqs[100:120]
    )
    np.testing.assert_array_equal(part, neg[100:120])
    other = sasrec.sequence_negatives(5, np.arange(b), 3, targets, n_items, seqs)
    assert not np.array_equal(other, neg)
    # uniform over the allowed items: one sequence, many draws
    seq = np.array([3, 9, 9, 1, 40])
    many = sasrec.sequence_negatives(
        0, np.arange(4000), 0, np.ones((4000, 5), np.int32), n_items, [seq] * 4000
    )
    counts = np.bincount(many.ravel(), minlength=n_items + 1)
    assert set(np.flatnonzero(counts)) == set(range(1, n_items + 1)) - {1, 3, 9, 40}
    expected = many.size / (n_items - 4)
    assert np.abs(counts[counts > 0] - expected).max() < 5 * np.sqrt(expected)


def test_sequence_negatives_reject_a_sequence_of_every_item():
    from jaxrec.errors import UserError

    with pytest.raises(UserError, match="every item"):
        sasrec.sequence_negatives(0, [0], 0, np.ones((1, 2), np.int32), 3, [np.array([1, 2, 3])])


@pytest.mark.parametrize("arch", ["official", "kang"])
def test_official_preset_selects_the_papers_block(arch):
    model = sasrec.SASRec(n_items=N_ITEMS, hidden=HIDDEN, max_len=MAX_LEN, arch=arch)
    sub = ParamSubset(sasrec.init_params(model, jax.random.PRNGKey(0)), "official")
    assert sub.paths == ["attn_out_1/kernel"] and sub.size == HIDDEN * HIDDEN
