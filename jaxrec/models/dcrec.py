"""DCRec (Yang et al., WWW 2023, "Debiased Contrastive Learning for Sequential
Recommendation") in Flax, transcribed from the authors' code (GitHub ``HKUDS/DCRec``,
``recbole/model/sequential_recommender/dcrec.py`` and ``run_DCRec.py``) and made a pure
per-sample loss for the influence engine.

What is the authors' (same definitions):

* **Transition graph** (``build_adj_graph``): item-item edges between consecutive items of every
  train sequence, weighted by their count, self-loops set to 1, symmetrically normalised
  ``D^-1/2 A D^-1/2``. **Co-interaction graph** (``build_sim_graph``): each item's
  ``sim_k + 1`` most cosine-similar items over the user-item matrix, weights row-normalised.
* **Graph encoder** (``GCN`` / ``gcn_forward``): two parameter-free propagations of the item
  embeddings (DGL ``GraphConv`` with ``norm="both"`` on the graph plus self-loops, edge
  weights as above), the mean of the three layers, then ``LayerNorm(mean + embedding)``;
  edge dropout (``graph_dropout_prob``) while training.
* **Sequence encoder**: item + position embeddings, LayerNorm, dropout, post-LN transformer
  blocks (RecBole's ``TransformerEncoder``); **fusion** (``graph_view_fusion``): attention
  ``softmax_v((x_v W) . a)`` over the sequence state and the two graph states of the last
  item; **loss**: cross-entropy of the fused state over all items.
* **Contrastive terms** (``cl_loss_adj``, ``cl_loss_a2s``): InfoNCE (cosine similarity,
  temperature ``cl_temp``) between the sequence state and the transition-graph state of the
  last item, and between the transition- and co-interaction-graph states of the last item;
  weighted by the **conformity** weight ``w`` and ``1 - w`` and by ``graphcl_coefficient``.
* **Conformity** (``_subgraph_agreement``): the sigmoid of the mean cosine agreement between
  the graph state of the last item and readouts of its neighbours: *civil* neighbours (linked
  to it by the user's own transitions) and *foreign* ones (the rest, at most 10).

What differs, so that a sample's loss depends on that sample alone (influence, paper Eq. 9-11,
is then the usual per-sample influence of this loss):

* **Negatives of the contrastive terms**: the authors' ``vanilla_loss`` contrasts a sample
  with the *other samples of its batch*; here each position contrasts with the sample's own
  negatives (the SASRec negatives of its row, from (seed, index, epoch): one uniform item per
  target position), so no batch-mate enters a sample's loss.
* **Conformity**: the authors remove the *whole batch's* transitions from the graph, rerun the
  GCN on it (view 1), min-max normalise the agreements over the batch, rescale them to mean
  ``weight_mean`` and add a KL term pulling the batch's weights towards ``N(weight_mean, 0.1)``.
  Here the civil neighbours are the sample's own transition neighbours (from its row), the
  foreign ones the first 10 others of a fixed neighbour table (the 20 strongest transitions of
  each item; the authors sample 10 at random each step), ``w = sigmoid((v2 + v3) / 2)`` with
  the authors' views 2 and 3 (view 1 needs a GCN per sample), ``1 - w`` the personalisation
  weight (the authors: ``max_batch(w) - w``), and there is no KL term (it constrains a batch's
  distribution, not a sample). Prefixes of length 1 get ``w = 0.5`` as in the authors' code.
* **Positions**: the authors train on every prefix of a sequence (``sequential_augmentation``)
  with a bidirectional encoder over the prefix; here one causal pass scores every prefix of a
  user (the state at ``t`` sees exactly the prefix items), positions count from the right as
  SASRec's, so a batch cut to any width that holds its sequences gives the same numbers. The
  per-sample loss is the mean over the user's prefixes of ``CE + coef * (w CL_adj + (1 - w)
  CL_a2s)``.
* The graphs are built from the train sequences only, and evaluation uses them too (the
  authors build separate test-time graphs including the test sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jaxrec.config import SurrogateConfig
from jaxrec.data import Dataset
from jaxrec.base import Batch, Loss, Params, PerSampleLoss
from jaxrec.models.sasrec import with_negatives
from jaxrec.models.spec import ModelSpec, forward
from jaxrec.models.bert4rec import _INIT, Encoder

N_FOREIGN = 10  # authors: at most 10 sampled foreign neighbours
NEIGHBOUR_TABLE = 20  # fixed candidate foreign neighbours per item (strongest transitions)


# ----------------------------------------------------------------------------- the graphs
@dataclass(eq=False)  # hashed by identity: a field of a Flax module that jit treats as static
class Graphs:
    """The two item graphs as GraphConv edge lists (``src``, ``dst``, ``coef`` with the
    ``norm="both"`` degree factors folded in) and the neighbour table ``[n_items + 1, K]``."""

    n_nodes: int
    adj: tuple  # (src, dst, coef) numpy arrays
    sim: tuple
    neighbours: np.ndarray

    def __hash__(self):
        return id(self)


def _graphconv_edges(rows, cols, weights, n: int):
    """DGL ``add_self_loop`` (weight 1) then ``GraphConv(norm="both")`` with ``edge_weight``:
    ``h_dst = sum_e w_e h_src / sqrt(out_deg(src) in_deg(dst))``, degrees counting edges.
    Returns ``(src, dst, coef)``."""
    src = np.concatenate([rows, np.arange(n)]).astype(np.int32)
    dst = np.concatenate([cols, np.arange(n)]).astype(np.int32)
    w = np.concatenate([weights, np.ones(n)]).astype(np.float64)
    out_deg = np.bincount(src, minlength=n).astype(np.float64)
    in_deg = np.bincount(dst, minlength=n).astype(np.float64)
    coef = w / np.sqrt(out_deg[src] * in_deg[dst])
    return src, dst, coef.astype(np.float32)


def build_graphs(train: list, n_items: int, sim_k: int = 4) -> Graphs:
    """The transition and co-interaction graphs of ``train`` (lists of item ids), as the
    authors' ``build_adj_graph`` and ``build_sim_graph``."""
    n = n_items + 1
    heads = [np.asarray(s[:-1]) for s in train if len(s) > 1]
    tails = [np.asarray(s[1:]) for s in train if len(s) > 1]
    a = np.concatenate(heads) if heads else np.zeros(0, np.int64)
    b = np.concatenate(tails) if tails else np.zeros(0, np.int64)
    counts = sp.coo_matrix((np.ones(2 * a.size), (np.r_[a, b], np.r_[b, a])), shape=(n, n))
    adj = counts.tocsr().tolil()
    adj.setdiag(np.ones(n))
    adj = adj.tocsr()
    d = np.asarray(adj.sum(1)).ravel() ** -0.5
    d[~np.isfinite(d)] = 0.0
    norm = (sp.diags(d) @ adj @ sp.diags(d)).tocoo()
    adj_edges = _graphconv_edges(norm.row, norm.col, norm.data, n)

    # neighbour table: each item's strongest transitions (not itself), 0-padded
    off = counts.tocsr()
    off.setdiag(0)
    off.eliminate_zeros()
    table = np.zeros((n, NEIGHBOUR_TABLE), np.int32)
    for i in range(n):
        lo, hi = off.indptr[i], off.indptr[i + 1]
        cols, vals = off.indices[lo:hi], off.data[lo:hi]
        top = cols[np.lexsort((cols, -vals))][:NEIGHBOUR_TABLE]
        table[i, : top.size] = top

    # co-interaction graph: cosine similarity of item columns of the user-item matrix
    users: np.ndarray | list = (
        np.concatenate([np.full(len(s), u) for u, s in enumerate(train)]) if train else []
    )
    items: np.ndarray | list = np.concatenate([np.asarray(s) for s in train]) if train else []
    ui = sp.csr_matrix((np.ones(len(items)), (users, items)), shape=(len(train), n))
    ui.data[:] = 1.0  # binary, as the authors' matrix of ones (repeats counted once)
    norms = np.sqrt(np.asarray(ui.multiply(ui).sum(0)).ravel())
    norms[norms == 0] = 1.0
    sim = sp.diags(1.0 / norms) @ (ui.T @ ui).tocsr() @ sp.diags(1.0 / norms)
    sim = sim.tocsr()
    row_parts: list[np.ndarray] = []
    col_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for i in range(n):
        lo, hi = sim.indptr[i], sim.indptr[i + 1]
        c, v = sim.indices[lo:hi], sim.data[lo:hi]
        keep = np.lexsort((c, -v))[: sim_k + 1]
        c, v = c[keep], v[keep]
        if v.sum() > 0:
            row_parts.append(np.full(c.size, i))
            col_parts.append(c)
            val_parts.append(v / v.sum())
    rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
    cols = np.concatenate(col_parts) if col_parts else np.zeros(0, np.int64)
    vals = np.concatenate(val_parts) if val_parts else np.zeros(0)
    sim_edges = _graphconv_edges(rows, cols, vals, n)
    return Graphs(n, adj_edges, sim_edges, table)


def _propagate(edges, x, n: int, keep=None):
    """One GraphConv step ``h_dst = sum_e coef_e x_src`` (``keep``: edge-dropout mask)."""
    src, dst, coef = edges
    c = jnp.asarray(coef) if keep is None else jnp.where(keep, jnp.asarray(coef), 0.0)
    return jax.ops.segment_sum(c[:, None] * x[jnp.asarray(src)], jnp.asarray(dst), n)


# ----------------------------------------------------------------------------- the model
class DCRec(nn.Module):
    """Sequence encoder, transition- and co-interaction-graph encoders, view fusion."""

    n_items: int
    graphs: Graphs
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.5
    graph_dropout: float = 0.5
    cl_weight: float = 0.1
    cl_temp: float = 1.0

    def setup(self) -> None:
        self.item_emb = nn.Embed(self.n_items + 1, self.hidden, embedding_init=_INIT)
        self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=_INIT)
        self.emb_ln = nn.LayerNorm(epsilon=1e-12)
        self.encoder = Encoder(self.hidden, self.blocks, self.heads, self.dropout, causal=True)
        self.graph_ln = nn.LayerNorm(epsilon=1e-12)
        self.attn_weights = self.param("attn_weights", _INIT, (self.hidden, self.hidden))
        self.attn = self.param("attn", _INIT, (1, self.hidden))
        self.drop = nn.Dropout(self.dropout)

    def graph_states(self, deterministic: bool = True) -> tuple[jax.Array, ...]:
        """``(adj, sim)`` graph-view states of every item ``[n_items + 1, hidden]`` each
        (authors' ``gcn_forward``: embedding dropout, 2 GraphConv layers, layer mean, residual
        LayerNorm; edge dropout while training)."""
        emb = self.drop(self.item_emb.embedding, deterministic=deterministic)
        out = []
        for edges in (self.graphs.adj, self.graphs.sim):
            keep = None
            if not deterministic and self.graph_dropout > 0:
                rng = self.make_rng("dropout")
                keep = jax.random.bernoulli(rng, 1 - self.graph_dropout, (len(edges[0]),))
            layers, h = [emb], emb
            for _ in range(2):
                h = _propagate(edges, h, self.graphs.n_nodes, keep)
                layers.append(h)
            out.append(self.graph_ln(jnp.mean(jnp.stack(layers), 0) + emb))
        return tuple(out)

    def sequence_states(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
        """Causal transformer state of every position ``[B, L, hidden]`` (the state at ``t``
        encodes the prefix ending with ``inputs[:, t]``)."""
        width = inputs.shape[1]
        x = self.item_emb(inputs) + self.pos_emb(jnp.arange(self.max_len - width, self.max_len))
        x = self.drop(self.emb_ln(x), deterministic=deterministic)
        return self.encoder(x, inputs > 0, deterministic)

    def fuse(self, seq: jax.Array, g_adj: jax.Array, g_sim: jax.Array) -> jax.Array:
        """Authors' ``graph_view_fusion``: attention over the three views ``[..., hidden]``."""
        mixed = jnp.stack([seq, g_adj, g_sim], 0)
        weights = jnp.sum((mixed @ self.attn_weights) * self.attn[0], -1)
        return jnp.sum(mixed * jax.nn.softmax(weights, 0)[..., None], 0)

    def __call__(self, inputs, deterministic: bool = True):
        """``(seq, g_adj_all, g_sim_all, fused)``: the sequence states ``[B, L, H]``, the graph
        states of all items, and the fused state of every position ``[B, L, H]``."""
        seq = self.sequence_states(inputs, deterministic)
        g_adj, g_sim = self.graph_states(deterministic)
        return seq, g_adj, g_sim, self.fuse(seq, g_adj[inputs], g_sim[inputs])


def build(cfg: SurrogateConfig, n_items: int, ds: Dataset | None = None) -> DCRec:
    """The model of a :class:`jaxrec.config.SurrogateConfig`; the graphs come from ``ds``'s
    train sequences (``dcrec_sim_k`` similar items per item)."""
    if ds is None:
        raise ValueError("ds=: DCRec builds its item graphs from the dataset")
    return DCRec(
        n_items=n_items,
        graphs=build_graphs(list(ds.train), n_items, cfg.dcrec_sim_k),
        hidden=cfg.hidden,
        blocks=cfg.blocks,
        heads=cfg.heads,
        max_len=cfg.max_len,
        dropout=cfg.dropout,
        graph_dropout=cfg.dcrec_graph_dropout,
        cl_weight=cfg.dcrec_cl_weight,
        cl_temp=cfg.dcrec_cl_temp,
    )


def init_params(model: DCRec, key: jax.Array) -> Params:
    """Initial parameters of ``model``."""
    return model.init(key, jnp.ones((1, model.max_len), jnp.int32))["params"]


def _norm(x, keepdims=False):
    """L2 norm over the last axis with a finite gradient at 0 (an empty readout is 0)."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=keepdims), 1e-24))


def _cos(a, b):
    """Cosine similarity over the last axis (the authors' ``eps=1e-12``)."""
    return jnp.sum(a * b, -1) / jnp.maximum(_norm(a) * _norm(b), 1e-12)


def _unit(x):
    return x / jnp.maximum(_norm(x, keepdims=True), 1e-12)


def _masked_mean(x, mask):
    """Mean of ``x [..., K, H]`` over ``mask [..., K]`` (0 where empty)."""
    m = mask[..., None].astype(x.dtype)
    return jnp.sum(x * m, -2) / jnp.maximum(jnp.sum(m, -2), 1.0)


def conformity(model: DCRec, batch: Batch, g_adj: jax.Array) -> jax.Array:
    """The per-sample conformity weight ``w [B, L]`` of every prefix (see the module
    docstring): ``sigmoid`` of the mean of the authors' views 2 (graph state vs foreign
    readout) and 3 (civil vs foreign readout); 0.5 for a prefix of length 1.

    The user's transitions are its ``(inputs[t], targets[t])`` pairs, so the weight of a row
    does not change when the batch is cut to a narrower width that holds it."""
    inputs, targets = batch["inputs"], batch["targets"]
    valid = targets > 0
    last = inputs  # the last item of every prefix
    # every transition end: [B, 2L] items, and which prefix's last item each neighbours
    items = jnp.concatenate([jnp.where(valid, targets, 0), jnp.where(valid, inputs, 0)], 1)
    near = jnp.concatenate(
        [
            (inputs[:, None, :] == last[:, :, None]) & valid[:, None, :],
            (targets[:, None, :] == last[:, :, None]) & valid[:, None, :],
        ],
        2,
    ) & (last[:, :, None] > 0)  # [B, L, 2L]: items[e] is a civil neighbour of last[t]
    same = (items[:, :, None] == items[:, None, :]) & (items[:, :, None] > 0)  # [B, 2L, 2L]
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), -1)  # e' < e
    first = ~jnp.any(same & earlier.T[None], 1)  # items[e] not seen before e
    f = near.astype(g_adj.dtype)
    civil = (jnp.einsum("bte,bef->btf", f, same.astype(f.dtype)) > 0) & first[:, None, :]
    civil_f = civil.astype(g_adj.dtype)
    civil_ro = jnp.einsum("bte,beh->bth", civil_f, g_adj[items]) / jnp.maximum(
        civil_f.sum(-1, keepdims=True), 1.0
    )
    # foreign: the first N_FOREIGN table neighbours that are not civil neighbours
    cand = jnp.asarray(model.graphs.neighbours)[last]  # [B, L, K]
    is_civil = jnp.any((cand[..., None] == items[:, None, None, :]) & civil[:, :, None, :], -1)
    ok = (cand > 0) & ~is_civil
    ok = ok & (jnp.cumsum(ok, -1) <= N_FOREIGN)
    foreign_ro = _masked_mean(g_adj[cand], ok)
    raw = g_adj[last]
    agreement = (_cos(raw, foreign_ro) + _cos(civil_ro, foreign_ro)) / 2
    w = jax.nn.sigmoid(agreement)
    length = jnp.cumsum(inputs > 0, 1)
    return jnp.where(length == 1, 0.5, w)


def _info_nce(z1, z2, z2_neg, neg_mask, temp):
    """``-log(e^{cos(z1, z2)/t} / (e^{cos(z1, z2)/t} + sum_k e^{cos(z1, neg_k)/t}))``:
    ``z1, z2 [B, L, H]``, ``z2_neg [B, K, H]`` with ``neg_mask [B, K]``."""
    pos = _cos(z1, z2) / temp
    neg = jnp.einsum("blh,bkh->blk", _unit(z1), _unit(z2_neg)) / temp
    neg = jnp.where(neg_mask[:, None, :], neg, -1e9)
    return jax.nn.logsumexp(jnp.concatenate([pos[..., None], neg], -1), -1) - pos


def _cross_entropy(fused, items, targets):
    """Softmax cross-entropy over all items ``[B, L]`` (class ``j`` is item ``j + 1``), one
    position at a time and rematerialised, so memory holds ``[B, n_items]`` logits, not
    ``[B, L, n_items]``."""

    @jax.checkpoint
    def one(args):
        h, t = args  # [B, H], [B]
        logits = h @ items.T
        picked = jnp.take_along_axis(logits, jnp.maximum(t - 1, 0)[:, None], -1)[:, 0]
        return jax.nn.logsumexp(logits, -1) - picked

    return jax.lax.map(one, (jnp.swapaxes(fused, 0, 1), targets.T)).T


def dcrec_terms(
    model: DCRec, params: Params, batch: Batch, *, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per position: ``(ce, cl_adj, cl_a2s, w, mask)``, each ``[B, L]``; with ``rng`` dropout
    (and edge dropout) is on."""
    deterministic = rng is None
    rngs = None if deterministic else {"dropout": rng}
    inputs, targets, negatives = batch["inputs"], batch["targets"], batch["negatives"]
    seq, g_adj, g_sim, fused = forward(model, params, inputs, deterministic, rngs=rngs)
    ce = _cross_entropy(fused, params["item_emb"]["embedding"][1:], targets)
    neg_mask = negatives > 0
    t = model.cl_temp
    cl_adj = _info_nce(seq, g_adj[inputs], g_adj[negatives], neg_mask, t)
    cl_a2s = _info_nce(g_adj[inputs], g_sim[inputs], g_sim[negatives], neg_mask, t)
    w = conformity(model, batch, g_adj)
    return ce, cl_adj, cl_a2s, w, targets > 0


def dcrec_per_sample(
    model: DCRec, params: Params, batch: Batch, *, rng: jax.Array | None = None
) -> jax.Array:
    """Mean over a sample's positions of ``CE + cl_weight * (w CL_adj + (1 - w) CL_a2s)``
    (0 for a sample without positions)."""
    ce, cl_adj, cl_a2s, w, mask = dcrec_terms(model, params, batch, rng=rng)
    terms = ce + model.cl_weight * (w * cl_adj + (1 - w) * cl_a2s)
    return jnp.sum(jnp.where(mask, terms, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)


def make_loss_fns(model: DCRec) -> tuple[Loss, PerSampleLoss]:
    """The pure ``(loss, per_sample_loss)`` pair (deterministic): per sample
    :func:`dcrec_per_sample`; ``loss`` is their mean."""

    def per_sample_loss(params, batch):
        return dcrec_per_sample(model, params, batch)

    def loss(params, batch):
        return jnp.mean(per_sample_loss(params, batch))

    return loss, per_sample_loss


def train_per_sample(model: DCRec, params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
    """The per-sample training loss with dropout on (key ``rng``)."""
    return dcrec_per_sample(model, params, batch, rng=rng)


def user_representations(model: DCRec, params: Params, inputs: jax.Array) -> jax.Array:
    """The fused state after the newest item ``[B, hidden]`` (authors' ``fast_predict``)."""
    return forward(model, params, inputs, True)[3][:, -1, :]


def item_scores(model: DCRec, params: Params, inputs: jax.Array) -> jax.Array:
    """Scores of every item ``[B, n_items + 1]`` for full ranking."""
    return user_representations(model, params, inputs) @ params["item_emb"]["embedding"].T


def el2n_error(model: DCRec) -> PerSampleLoss:
    """EL2N error (Paul et al. 2021) of the recommendation head: the mean over a sample's
    positions of ``||softmax(logits) - onehot(target)||_2``."""

    def error(params, batch):
        fused = model.apply({"params": params}, batch["inputs"], True)[3]
        p = jax.nn.softmax(fused @ params["item_emb"]["embedding"][1:].T, -1)
        tgt = batch["targets"]
        e = jnp.linalg.norm(p - jax.nn.one_hot(jnp.maximum(tgt - 1, 0), p.shape[-1]), axis=-1)
        mask = tgt > 0
        return jnp.sum(jnp.where(mask, e, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)

    return error


SPEC = ModelSpec(
    build=build,
    init_params=init_params,
    make_loss_fns=make_loss_fns,
    train_per_sample=train_per_sample,
    item_scores=item_scores,
    user_representations=user_representations,
    training_data=with_negatives,
    el2n_error=el2n_error,
)
