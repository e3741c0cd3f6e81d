"""The ``arch="official"`` SASRec against a PyTorch transcription of the paper's code
(github Linxyhaha/DEALRec ``code/prune/modules.py``, ``models.py``, ``trainers.py``) on the same
weights; ``negatives="sequence"`` against the official rule; the preset of the scored block."""

import math

import jax
import numpy as np
import pytest
import torch
import torch.nn as tnn

from jaxrec.influence.params import ParamSubset
from jaxrec.models import sasrec

N_ITEMS, HIDDEN, HEADS, BLOCKS, MAX_LEN = 30, 16, 2, 2, 12


# ----------------------------------------------------------------------------- transcription
# modules.py / models.py of the official code, minus dropout (eval mode) and CUDA.
class LayerNorm(tnn.Module):
    def __init__(self, hidden_size, eps=1e-12):
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(hidden_size))
        self.bias = tnn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x + self.bias


class SelfAttention(tnn.Module):
    def __init__(self):
        super().__init__()
        self.num_attention_heads = HEADS
        self.attention_head_size = HIDDEN // HEADS
        self.all_head_size = HIDDEN
        self.query = tnn.Linear(HIDDEN, HIDDEN)
        self.key = tnn.Linear(HIDDEN, HIDDEN)
        self.value = tnn.Linear(HIDDEN, HIDDEN)
        self.dense = tnn.Linear(HIDDEN, HIDDEN)
        self.LayerNorm = LayerNorm(HIDDEN, eps=1e-12)

    def _transpose_for_scores(self, x):
        x = x.view(*x.size()[:-1], self.num_attention_heads, self.attention_head_size)
        return x.permute(0, 2, 1, 3)

    def forward(self, input_tensor, attention_mask):
        q = self._transpose_for_scores(self.query(input_tensor))
        k = self._transpose_for_scores(self.key(input_tensor))
        v = self._transpose_for_scores(self.value(input_tensor))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = tnn.Softmax(dim=-1)(scores + attention_mask)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(*ctx.size()[:-2], self.all_head_size)
        return self.LayerNorm(self.dense(ctx) + input_tensor)


class PointWiseFeedForward(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d_1 = tnn.Conv1d(HIDDEN, HIDDEN, kernel_size=(1,))
        self.conv1d_2 = tnn.Conv1d(HIDDEN, HIDDEN, kernel_size=(1,))
        self.activation = tnn.ReLU()
        self.LayerNorm = LayerNorm(HIDDEN, eps=1e-12)

    def forward(self, input_tensor):
        h = self.activation(self.conv1d_1(input_tensor.transpose(1, 2)).transpose(1, 2))
        h = self.activation(self.conv1d_2(h.transpose(1, 2)).transpose(1, 2))
        return self.LayerNorm(h + input_tensor)


class Layer(tnn.Module):
    def __init__(self):
        super().__init__()
        self.attention = SelfAttention()
        self.intermediate = PointWiseFeedForward()

    def forward(self, hidden_states, attention_mask):
        return self.intermediate(self.attention(hidden_states, attention_mask))


class OfficialSASRec(tnn.Module):
    def __init__(self):
        super().__init__()
        self.item_embeddings = tnn.Embedding(N_ITEMS + 1, HIDDEN, padding_idx=0)
        self.position_embeddings = tnn.Embedding(MAX_LEN, HIDDEN)
        self.layer = tnn.ModuleList([Layer() for _ in range(BLOCKS)])
        self.LayerNorm = LayerNorm(HIDDEN, eps=1e-12)

    def finetune(self, input_ids):
        positions = torch.arange(input_ids.size(1)).unsqueeze(0).expand_as(input_ids)
        x = self.item_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.LayerNorm(x)
        mask = (input_ids > 0).long().unsqueeze(1).unsqueeze(2)
        n = input_ids.size(1)
        subsequent = (torch.triu(torch.ones((1, n, n)), diagonal=1) == 0).unsqueeze(1).long()
        mask = (1.0 - (mask * subsequent).to(x.dtype)) * -10000.0
        for layer in self.layer:
            x = layer(x, mask)
        return x

    def cross_entropy(self, seq_out, pos_ids, neg_ids):  # trainers.Trainer.cross_entropy
        pos = self.item_embeddings(pos_ids).view(-1, HIDDEN)
        neg = self.item_embeddings(neg_ids).view(-1, HIDDEN)
        seq_emb = seq_out.reshape(-1, HIDDEN)
        pos_logits = torch.sum(pos * seq_emb, -1)
        neg_logits = torch.sum(neg * seq_emb, -1)
        istarget = (pos_ids > 0).view(-1).float()
        return torch.sum(
            -torch.log(torch.sigmoid(pos_logits) + 1e-24) * istarget
            - torch.log(1 - torch.sigmoid(neg_logits) + 1e-24) * istarget
        ) / (torch.sum(istarget) + 1e-24)


def torch_from_flax(params) -> OfficialSASRec:
    """The transcription holding the Flax parameters (Dense kernels are transposed)."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    m = OfficialSASRec().double()
    with torch.no_grad():
        m.item_embeddings.weight.copy_(t(params["item_emb"]["embedding"]))
        m.position_embeddings.weight.copy_(t(params["pos_emb"]["embedding"]))
        m.LayerNorm.weight.copy_(t(params["emb_ln"]["scale"]))
        m.LayerNorm.bias.copy_(t(params["emb_ln"]["bias"]))
        for i, layer in enumerate(m.layer):
            att, ffn = layer.attention, layer.intermediate
            for mod, name in [
                (att.query, "query"),
                (att.key, "key"),
                (att.value, "value"),
                (att.dense, "attn_out"),
            ]:
                mod.weight.copy_(t(params[f"{name}_{i}"]["kernel"]).T)
                mod.bias.copy_(t(params[f"{name}_{i}"]["bias"]))
            for mod, name in [(ffn.conv1d_1, "ffn_1"), (ffn.conv1d_2, "ffn_2")]:
                mod.weight.copy_(t(params[f"{name}_{i}"]["kernel"]).T[:, :, None])
                mod.bias.copy_(t(params[f"{name}_{i}"]["bias"]))
            for ln, name in [(att.LayerNorm, "attn_ln"), (ffn.LayerNorm, "ffn_ln")]:
                ln.weight.copy_(t(params[f"{name}_{i}"]["scale"]))
                ln.bias.copy_(t(params[f"{name}_{i}"]["bias"]))
    return m


# ----------------------------------------------------------------------------- fixtures
def official_model():
    model = sasrec.SASRec(
        n_items=N_ITEMS, hidden=HIDDEN, blocks=BLOCKS, heads=HEADS, max_len=MAX_LEN, arch="official"
    )
    params = sasrec.init_params(model, jax.random.PRNGKey(3))
    # trained-looking LayerNorms and biases (the init has them at 1 / 0)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree_util.tree_unflatten(tree, leaves)


def official_batch(b=6, seed=0):
    """Left-padded next-item samples (lengths 0..8) and their official-rule negatives."""
    rng = np.random.default_rng(seed)
    seqs = [
        rng.choice(np.arange(1, N_ITEMS + 1), size=n, replace=False) for n in [0, 2, 5, 9, 3, 7]
    ]
    seqs = seqs[:b]
    inputs = np.zeros((b, MAX_LEN), np.int32)
    targets = np.zeros((b, MAX_LEN), np.int32)
    for r, s in enumerate(seqs):
        if len(s) > 1:
            inputs[r, MAX_LEN - len(s) + 1 :], targets[r, MAX_LEN - len(s) + 1 :] = s[:-1], s[1:]
    neg = sasrec.sequence_negatives(0, np.arange(b), 0, targets, N_ITEMS, seqs)
    return {"inputs": inputs, "targets": targets, "negatives": neg}, seqs


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
