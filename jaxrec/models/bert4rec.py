"""BERT4Rec (Sun et al., CIKM 2019) in Flax: a bidirectional transformer trained with the cloze
objective, under the same pure-loss contract as SASRec.

A training sample is a user's whole train sequence with ``m = max(1, round(n * mask_prob))``
of its ``n`` items (at most ``round(max_len * mask_prob)``, the original's
``max_predictions_per_seq``) replaced by the ``[mask]`` item ``n_items + 1``; the model predicts
each masked item with a softmax over all items (the original's and RecBole's cross-entropy).
Which positions are masked is drawn from a key folded from (seed, sample index, epoch), as
SASRec's negatives, so each sample's loss is reproducible on its own and the influence of a
sample is well defined (the influence stage uses the masks of epoch 0).

The batch has SASRec's keys: ``inputs`` is the masked sequence, ``targets`` holds the original
item at masked positions (0 elsewhere) and ``negatives`` is all 0 (unused: full softmax). At
test time ``[mask]`` is appended after the history (dropping its oldest item when full) and the
scores at that position rank all items.

Departures from the original: positions count from the right and attention masks padding keys
(so a batch cut to any width that holds its sequences gives the same numbers, as SASRec); no
80/10/10 replacement rule (the original BERT4Rec also always uses ``[mask]``); no extra
"last item masked" duplicates of each sequence; users with fewer than two train items have no
sample (as SASRec, whose training arrays this model shares).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import SurrogateConfig
from jaxrec.data import Dataset
from jaxrec.base import ArrayLike, Batch, Loss, Params, PerSampleLoss
from jaxrec.models.spec import ModelSpec, forward

_NEG = -1e9  # attention mask value: finite, so fully-masked (padding) rows stay NaN-free
_INIT = nn.initializers.normal(0.02)  # BERT's / RecBole's initializer range


def n_masks(lengths: ArrayLike, mask_prob: float, max_len: int) -> np.ndarray:
    """Masked positions of a sequence of each length: ``max(1, round(n p))`` capped at
    ``max(1, round(max_len p))``, 0 for an empty sequence (round half up). Works on NumPy ints
    and on Python ints (static widths)."""
    cap = max(1, int(np.floor(max_len * mask_prob + 0.5)))
    m = np.maximum(1, np.floor(np.asarray(lengths) * mask_prob + 0.5).astype(np.int64))
    return np.where(np.asarray(lengths) > 0, np.minimum(m, cap), 0)


class Encoder(nn.Module):
    """Post-LN transformer blocks (BERT's, RecBole's ``TransformerEncoder``): attention and a
    GELU feed-forward, each followed by dropout, a residual and LayerNorm. Attention is
    bidirectional over the valid (non-padding) keys, or causal with ``causal``."""

    hidden: int
    blocks: int
    heads: int
    dropout: float
    causal: bool = False

    @nn.compact
    def __call__(self, x, valid, deterministic: bool = True):
        """``x [B, L, hidden]``, ``valid [B, L]`` bool -> ``[B, L, hidden]``."""
        eps = 1e-12
        drop = nn.Dropout(self.dropout)
        dense = lambda n, name: nn.Dense(n, kernel_init=_INIT, name=name)  # noqa: E731
        mask = valid[:, None, None, :]  # [B, 1, 1, Lk]: padding keys off
        if self.causal:
            width = x.shape[1]
            mask = mask & jnp.tril(jnp.ones((width, width), bool))[None, None]
        head_dim = self.hidden // self.heads
        split = lambda t: t.reshape(*t.shape[:2], self.heads, head_dim)  # noqa: E731
        for i in range(self.blocks):
            q, k, v = jnp.split(dense(3 * self.hidden, f"qkv_{i}")(x), 3, axis=-1)
            logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(head_dim)
            probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1)
            probs = drop(probs, deterministic=deterministic)
            attn = jnp.einsum("bhqk,bkhd->bqhd", probs, split(v)).reshape(x.shape)
            attn = drop(dense(self.hidden, f"attn_out_{i}")(attn), deterministic=deterministic)
            x = nn.LayerNorm(epsilon=eps, name=f"attn_ln_{i}")(x + attn)
            h = nn.gelu(dense(4 * self.hidden, f"ffn_1_{i}")(x), approximate=False)
            h = drop(dense(self.hidden, f"ffn_2_{i}")(h), deterministic=deterministic)
            x = nn.LayerNorm(epsilon=eps, name=f"ffn_ln_{i}")(x + h)
        return x


class BERT4Rec(nn.Module):
    """Item + position embeddings, post-LN bidirectional transformer blocks, the output head."""

    n_items: int
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.5
    mask_prob: float = 0.2

    @property
    def mask_item(self) -> int:
        return self.n_items + 1

    def setup(self) -> None:
        eps = 1e-12
        self.item_emb = nn.Embed(self.n_items + 2, self.hidden, embedding_init=_INIT)
        self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=_INIT)
        self.emb_ln = nn.LayerNorm(epsilon=eps)
        self.encoder = Encoder(self.hidden, self.blocks, self.heads, self.dropout)
        self.head = nn.Dense(self.hidden, kernel_init=_INIT)
        self.head_ln = nn.LayerNorm(epsilon=eps)
        self.out_bias = self.param("out_bias", nn.initializers.zeros, (self.n_items + 2,))
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, inputs, deterministic: bool = True):
        """Output-head state of every position: ``[B, L] int -> [B, L, hidden]``."""
        width = inputs.shape[1]
        x = self.item_emb(inputs) + self.pos_emb(jnp.arange(self.max_len - width, self.max_len))
        x = self.drop(self.emb_ln(x), deterministic=deterministic)
        x = self.encoder(x, inputs > 0, deterministic)
        return self.head_ln(nn.gelu(self.head(x), approximate=False))


def build(cfg: SurrogateConfig, n_items: int, ds: Dataset | None = None) -> BERT4Rec:
    """The model of a :class:`jaxrec.config.SurrogateConfig` (``hidden``, ``blocks``,
    ``heads``, ``max_len``, ``dropout``, ``mask_prob``)."""
    return BERT4Rec(
        n_items=n_items,
        hidden=cfg.hidden,
        blocks=cfg.blocks,
        heads=cfg.heads,
        max_len=cfg.max_len,
        dropout=cfg.dropout,
        mask_prob=cfg.mask_prob,
    )


def init_params(model: BERT4Rec, key: jax.Array) -> Params:
    """Initial parameters of ``model``."""
    return model.init(key, jnp.ones((1, model.max_len), jnp.int32))["params"]


def _item_logits(params, h):
    """Logits of the real items ``1..n_items`` (class ``j`` is item ``j + 1``)."""
    table = params["item_emb"]["embedding"][1:-1]
    return h @ table.T + params["out_bias"][1:-1]


def masked_logits(
    model: BERT4Rec, params: Params, batch: Batch, *, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Item logits at each row's masked positions: ``(logits [B, k, n_items], targets [B, k])``.

    Only the (at most) ``k = n_masks(width)`` masked positions of each row are scored, gathered
    in position order (``targets`` 0 where a row has fewer), so the cost is that of the masked
    items, not of the whole width. With ``rng`` dropout is on."""
    deterministic = rng is None
    rngs = None if deterministic else {"dropout": rng}
    h = forward(model, params, batch["inputs"], deterministic, rngs=rngs)
    targets = batch["targets"]
    k = max(1, int(n_masks(targets.shape[1], model.mask_prob, model.max_len)))
    pos = jnp.argsort(~(targets > 0), axis=1, stable=True)[:, :k]
    hk = jnp.take_along_axis(h, pos[..., None], 1)
    return _item_logits(params, hk), jnp.take_along_axis(targets, pos, 1)


def _mean_over_masked(values, tgt):
    valid = tgt > 0
    return jnp.sum(jnp.where(valid, values, 0.0), -1) / jnp.maximum(jnp.sum(valid, -1), 1)


def cloze_per_sample(
    model: BERT4Rec, params: Params, batch: Batch, *, rng: jax.Array | None = None
) -> jax.Array:
    """Mean cross-entropy of each sample's masked items (BERT4Rec's cloze loss; 0 for a sample
    without any); with ``rng`` dropout is on."""
    logits, tgt = masked_logits(model, params, batch, rng=rng)
    picked = jnp.take_along_axis(logits, jnp.maximum(tgt - 1, 0)[..., None], -1)[..., 0]
    return _mean_over_masked(jax.nn.logsumexp(logits, -1) - picked, tgt)


def make_loss_fns(model: BERT4Rec) -> tuple[Loss, PerSampleLoss]:
    """The pure ``(loss, per_sample_loss)`` pair (deterministic): per sample the cloze loss of
    its fixed masks; ``loss`` is their mean (the objective the influence engine inverts)."""

    def per_sample_loss(params, batch):
        return cloze_per_sample(model, params, batch)

    def loss(params, batch):
        return jnp.mean(per_sample_loss(params, batch))

    return loss, per_sample_loss


def train_per_sample(model: BERT4Rec, params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
    """The per-sample cloze loss with dropout on (key ``rng``)."""
    return cloze_per_sample(model, params, batch, rng=rng)


def _with_mask_slot(model: BERT4Rec, inputs):
    """The history with ``[mask]`` appended (its oldest item dropped): the test-time input."""
    mask = jnp.full((inputs.shape[0], 1), model.mask_item, inputs.dtype)
    return jnp.concatenate([inputs[:, 1:], mask], axis=1)


def user_representations(model: BERT4Rec, params: Params, inputs: jax.Array) -> jax.Array:
    """The output-head state at the appended ``[mask]`` ``[B, hidden]``."""
    return forward(model, params, _with_mask_slot(model, inputs), True)[:, -1, :]


def item_scores(model: BERT4Rec, params: Params, inputs: jax.Array) -> jax.Array:
    """Scores of every item ``[B, n_items + 1]`` (column 0, padding, is masked by the ranking)."""
    logits = _item_logits(params, user_representations(model, params, inputs))
    return jnp.concatenate([jnp.zeros_like(logits[:, :1]), logits], axis=1)


def training_data(
    arrays: dict,
    seed: int,
    epoch: int,
    n_items: int,
    cfg: SurrogateConfig,
    sequences: object = None,
) -> dict:
    """Cloze samples of every user for ``epoch``: the masked sequence, the masked items and
    all-zero negatives. Masked positions depend on (seed, row index, epoch) alone."""
    inputs, targets = np.asarray(arrays["inputs"]), np.asarray(arrays["targets"])
    seq = np.concatenate([inputs[:, 1:], targets[:, -1:]], axis=1)  # the whole train sequence
    seq = np.where((targets > 0).any(1, keepdims=True), seq, 0)
    valid = seq > 0
    base = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(arrays["index"]))
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (seq.shape[1],)))(keys))
    rank = np.argsort(np.argsort(np.where(valid, u, 2.0), axis=1, kind="stable"), axis=1)
    masked = valid & (rank < n_masks(valid.sum(1), cfg.mask_prob, seq.shape[1])[:, None])
    return {
        **arrays,
        "inputs": np.where(masked, n_items + 1, seq).astype(np.int32),
        "targets": np.where(masked, seq, 0).astype(np.int32),
        "negatives": np.zeros_like(seq, dtype=np.int32),
    }


def el2n_error(model: BERT4Rec) -> PerSampleLoss:
    """EL2N error (Paul et al. 2021) for a softmax model: the mean over a sample's masked
    items of ``||softmax(logits) - onehot(target)||_2``; 0 without masked items."""

    def error(params, batch):
        logits, tgt = masked_logits(model, params, batch)
        onehot = jax.nn.one_hot(jnp.maximum(tgt - 1, 0), logits.shape[-1])
        return _mean_over_masked(jnp.linalg.norm(jax.nn.softmax(logits, -1) - onehot, axis=-1), tgt)

    return error


SPEC = ModelSpec(
    build=build,
    init_params=init_params,
    make_loss_fns=make_loss_fns,
    train_per_sample=train_per_sample,
    item_scores=item_scores,
    user_representations=user_representations,
    training_data=training_data,
    el2n_error=el2n_error,
    sampled_negatives=False,  # cloze masks, no negatives: one draw for influence
)
