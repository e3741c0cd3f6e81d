"""SASRec (Kang & McAuley, 2018) in Flax: the surrogate recommender of DEALRec (paper Sec. 3.2).

The model is exposed through pure functions, which is all the influence engine needs::

    loss, per_sample_loss = make_loss_fns(model, weighting, positions)
    per_sample_loss(params, batch) -> [B]      # one BCE loss per training sample (user)
    loss(params, batch) -> scalar              # their mean

Two blocks (``SASRec.arch``): ``"official"``, the paper code's post-LayerNorm SASRec (the
default of :class:`jaxrec.config.SurrogateConfig`), and ``"kang"``, Kang & McAuley's
pre-LayerNorm one. Negatives: :func:`sequence_negatives` (outside the user's whole sequence,
the paper's code) or :func:`sample_negatives` (anything but the target).

A batch is ``{"inputs", "targets", "negatives"}``, each ``[B, L]`` int32, left-padded with 0:
at every non-padding position the model is asked to score the target (the next item) above the
negative. Positions are absolute from the right (the newest item always has position
``max_len - 1``) and attention masks padding keys, so a batch may be cut to any width ``L <=
max_len`` that holds its longest sequence and gives exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import SurrogateConfig
from jaxrec.data import Dataset
from jaxrec.base import ArrayLike, Batch, Loss, Params, PerSampleLoss
from jaxrec.errors import UserError
from jaxrec.models.spec import Arrays, ModelSpec, forward

_NEG = -1e9  # attention mask value: finite, so fully-masked (padding) rows stay NaN-free


Arch = Literal["official", "kang"]


def _symmetric_uniform(fan_in: int):
    """PyTorch's default ``Conv1d``/``Linear`` initialisation: ``U(-1/sqrt(fan_in), +)``."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SASRec(nn.Module):
    """Self-attentive sequential recommender: item + position embeddings, causal blocks.

    ``arch`` picks the block (both have the same 1.16M parameters on Games at hidden 64):

    * ``"official"``: the S3Rec/BERT-style post-LayerNorm SASRec of the paper's code
      (github Linxyhaha/DEALRec ``code/prune/modules.py``, ``models.py``): LayerNorm(item +
      position embedding), then per block ``x = LN(x + W_o attn(x))``, ``x = LN(x +
      relu(W_2 relu(W_1 x)))`` (note the ReLU after the second FFN layer, as there), no final
      LayerNorm, no ``sqrt(hidden)`` embedding scale, LayerNorm eps 1e-12; initialisation as
      ``SASRecModel.__init_weights``: N(0, 0.02) embeddings and attention weights with zero
      biases, the FFN (``nn.Conv1d`` there) at PyTorch's default ``U(+-1/sqrt(64))``.
      Departure: padding rows are masked with ``-1e9`` instead of adding ``-10000`` (the same
      numbers at every real position) and zeroed at the output.
    * ``"kang"``: the pre-LayerNorm block of Kang & McAuley's reference code (query from the
      LayerNorm'd input, keys/values from the raw one; a final LayerNorm; Xavier embeddings).

    Parameter names are shared where the roles are: ``item_emb``, ``pos_emb``,
    ``attn_out_{i}`` (the attention output projection, the official
    ``item_encoder.layer.{i}.attention.dense``), ``ffn_1_{i}``, ``ffn_2_{i}``, ``attn_ln_{i}``,
    ``ffn_ln_{i}``.
    """

    n_items: int
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.5
    arch: Arch = "kang"

    def setup(self) -> None:
        if self.arch not in ("official", "kang"):
            raise ValueError(f"arch must be 'official' or 'kang', got {self.arch!r}")
        blocks = range(self.blocks)
        if self.arch == "official":
            normal = nn.initializers.normal(0.02)
            dense = lambda name: nn.Dense(self.hidden, kernel_init=normal, name=name)  # noqa: E731
            conv = lambda name: nn.Dense(  # noqa: E731
                self.hidden,
                kernel_init=_symmetric_uniform(self.hidden),
                bias_init=_symmetric_uniform(self.hidden),
                name=name,
            )
            norm = lambda name: nn.LayerNorm(  # noqa: E731
                epsilon=1e-12, use_fast_variance=False, name=name
            )
            self.item_emb = nn.Embed(
                self.n_items + 1, self.hidden, embedding_init=normal, name="item_emb"
            )
            self.pos_emb = nn.Embed(
                self.max_len, self.hidden, embedding_init=normal, name="pos_emb"
            )
            self.emb_ln = norm("emb_ln")
            self.query = [dense(f"query_{i}") for i in blocks]
            self.key = [dense(f"key_{i}") for i in blocks]
            self.value = [dense(f"value_{i}") for i in blocks]
            self.attn_out = [dense(f"attn_out_{i}") for i in blocks]
            self.attn_ln = [norm(f"attn_ln_{i}") for i in blocks]
            self.ffn_1 = [conv(f"ffn_1_{i}") for i in blocks]
            self.ffn_2 = [conv(f"ffn_2_{i}") for i in blocks]
            self.ffn_ln = [norm(f"ffn_ln_{i}") for i in blocks]
        else:
            # Xavier-normal embeddings as in the reference SASRec code (Flax's default std 1.0,
            # times sqrt(hidden), would swamp the positional signal)
            init = nn.initializers.xavier_normal()
            self.item_emb = nn.Embed(
                self.n_items + 1, self.hidden, embedding_init=init, name="item_emb"
            )
            self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=init, name="pos_emb")
            self.attn_ln = [nn.LayerNorm(epsilon=1e-8, name=f"attn_ln_{i}") for i in blocks]
            self.query = [nn.Dense(self.hidden, name=f"query_{i}") for i in blocks]
            self.key_value = [nn.Dense(2 * self.hidden, name=f"key_value_{i}") for i in blocks]
            self.attn_out = [nn.Dense(self.hidden, name=f"attn_out_{i}") for i in blocks]
            self.ffn_ln = [nn.LayerNorm(epsilon=1e-8, name=f"ffn_ln_{i}") for i in blocks]
            self.ffn_1 = [nn.Dense(self.hidden, name=f"ffn_1_{i}") for i in blocks]
            self.ffn_2 = [nn.Dense(self.hidden, name=f"ffn_2_{i}") for i in blocks]
            self.last_ln = nn.LayerNorm(epsilon=1e-8, name="last_ln")
        self.drop = nn.Dropout(self.dropout)

    def _attend(self, q, k, v, mask, deterministic):
        """Multi-head scaled dot-product attention ``[B, L, hidden]`` (padding keys masked)."""
        head_dim = self.hidden // self.heads
        split = lambda t: t.reshape(*t.shape[:2], self.heads, head_dim)  # noqa: E731
        logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(head_dim)
        probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1)
        probs = self.drop(probs, deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, split(v)).reshape(q.shape)

    def __call__(self, inputs, deterministic: bool = True):
        """Hidden state of every position: ``[B, L] int -> [B, L, hidden]``."""
        width = inputs.shape[1]
        valid = (inputs > 0)[..., None]
        causal = jnp.tril(jnp.ones((width, width), bool))
        mask = causal[None, None] & (inputs > 0)[:, None, None, :]  # [B, 1, Lq, Lk]
        pos = self.pos_emb(jnp.arange(self.max_len - width, self.max_len))[None]
        drop = lambda t: self.drop(t, deterministic=deterministic)  # noqa: E731
        if self.arch == "official":
            x = drop(self.emb_ln(self.item_emb(inputs) + pos))
            for i in range(self.blocks):
                attn = self._attend(
                    self.query[i](x), self.key[i](x), self.value[i](x), mask, deterministic
                )
                x = self.attn_ln[i](x + drop(self.attn_out[i](attn)))
                h = nn.relu(self.ffn_2[i](nn.relu(self.ffn_1[i](x))))
                x = self.ffn_ln[i](x + drop(h))
            return x * valid
        x = self.item_emb(inputs) * jnp.sqrt(self.hidden).astype(jnp.float32)
        x = drop(x + pos) * valid
        for i in range(self.blocks):
            q_in = self.attn_ln[i](x)
            k, v = jnp.split(self.key_value[i](x), 2, axis=-1)
            attn = self._attend(self.query[i](q_in), k, v, mask, deterministic)
            x = q_in + self.attn_out[i](attn)
            y = self.ffn_ln[i](x)
            h = drop(nn.relu(self.ffn_1[i](y)))
            x = y + drop(self.ffn_2[i](h))
            x = x * valid
        return self.last_ln(x)

    def item_embeddings(self) -> jax.Array:
        """The item embedding table ``[n_items + 1, hidden]`` (row 0 is padding)."""
        return self.item_emb.embedding


def init_params(model: SASRec, key: jax.Array) -> Params:
    """Initial parameters of ``model``."""
    return model.init(key, jnp.ones((1, model.max_len), jnp.int32))["params"]


def position_logits(
    model: SASRec, params: Params, batch: Batch, *, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Target and negative logits at every position (paper's surrogate objective).

    Returns ``(pos_logits, neg_logits, mask)``, each ``[B, L]``; ``mask`` marks the positions
    that have a target. With ``rng`` given, dropout is on (training); else deterministic.
    """
    deterministic = rng is None
    rngs = None if rng is None else {"dropout": rng}
    h = forward(model, params, batch["inputs"], deterministic, rngs=rngs)
    table = params["item_emb"]["embedding"]
    pos = jnp.sum(h * table[batch["targets"]], -1)
    neg = jnp.sum(h * table[batch["negatives"]], -1)
    return pos, neg, batch["targets"] > 0


LossWeighting = Literal["sample", "position"]


def bce_per_sample(
    pos: jax.Array,
    neg: jax.Array,
    mask: jax.Array,
    weighting: LossWeighting = "sample",
    positions: float = 1.0,
) -> jax.Array:
    """One BCE loss per sample from its position terms ``-log s(pos) - log(1 - s(neg))``.

    Args:
      pos, neg, mask: ``[B, L]`` from :func:`position_logits`.
      weighting: ``"sample"``: the mean over the sample's target positions (every user weighs
        the same); ``"position"``: their sum divided by the constant ``positions`` (every
        target position weighs the same, as the official ``trainers.cross_entropy``, which
        divides a batch's summed terms by its number of target positions).
      positions: the divisor of ``"position"``: the training set's mean number of target
        positions per user (:func:`positions_per_sample`), so that the mean over all users is
        exactly the official loss on the whole training set. Departure: the official divisor
        is each batch's own count, which would make a sample's loss depend on its batch-mates.
    Returns:
      ``[B]`` (0 for a sample without targets).
    """
    terms = jax.nn.softplus(-pos) + jax.nn.softplus(neg)
    total = jnp.sum(jnp.where(mask, terms, 0.0), -1)
    if weighting == "position":
        return total / positions
    if weighting != "sample":
        raise ValueError(f"weighting must be 'sample' or 'position', got {weighting!r}")
    return total / jnp.maximum(jnp.sum(mask, -1), 1)


def positions_per_sample(targets: ArrayLike) -> float:
    """Mean number of target positions per row of ``targets`` ``[n, L]`` (at least 1): the
    constant divisor of the ``"position"`` loss weighting."""
    return max(float(np.mean(np.sum(np.asarray(targets) > 0, -1))), 1.0)


def make_loss_fns(
    model: SASRec, weighting: LossWeighting = "sample", positions: float = 1.0
) -> tuple[Loss, PerSampleLoss]:
    """The pure ``(loss, per_sample_loss)`` pair of ``model`` (deterministic: no dropout).

    ``per_sample_loss(params, batch) -> [B]`` is the BCE loss of each user's sample
    (:func:`bce_per_sample` with ``weighting`` and ``positions``); ``loss(params, batch)`` is
    its mean: the training objective whose Hessian the influence engine inverts (paper Eq.
    9-10).
    """

    def per_sample_loss(params, batch):
        return bce_per_sample(*position_logits(model, params, batch), weighting, positions)

    def loss(params, batch):
        return jnp.mean(per_sample_loss(params, batch))

    return loss, per_sample_loss


def per_user_loss(model: SASRec) -> PerSampleLoss:
    """Each user's loss as the paper's code computes it on a batch of one:
    ``(params, batch) -> [B]``, the mean over the user's target positions of
    ``-log s(pos) - log(1 - s(neg))`` (:func:`bce_per_sample` with ``weighting="sample"``).

    The official ``FineTrainer.get_sample_loss`` (github Linxyhaha/DEALRec
    ``code/prune/trainers.py``) runs ``cross_entropy`` on the user's sample alone, in eval mode:
    ``sum_t istarget_t (-log(s(pos_t) + 1e-24) - log(1 - s(neg_t) + 1e-24)) / (sum_t
    istarget_t + 1e-24)``, ``istarget = target > 0``, one negative per position. The influence
    score of user ``i`` (paper Eq. 11) is the gradient of this loss, whatever the training
    loss's weighting (``influence.sample_loss: per-user``). Departure: ``softplus`` instead of
    ``log(s + 1e-24)``: the same value and gradient wherever ``s(neg) < 1`` in float32 (the
    official float32 form saturates at a loss of 55.3 with a zero gradient once ``s(neg)``
    rounds to 1, at a negative logit above about 17); a user without targets has loss 0 in
    both.
    """

    def loss(params, batch):
        return bce_per_sample(*position_logits(model, params, batch), "sample")

    return loss


def user_representations(model: SASRec, params: Params, inputs: jax.Array) -> jax.Array:
    """The hidden state at the newest position ``[B, hidden]``: the user's representation,
    scored against item embeddings for full ranking."""
    return forward(model, params, inputs, True)[:, -1, :]


def sample_negatives(
    seed: int, index: ArrayLike, epoch: int, targets: ArrayLike, n_items: int
) -> ArrayLike:
    """One negative item per target position, never equal to the target, reproducible from
    ``(seed, sample index, epoch)`` alone, so any sample's loss can be recomputed on its own.
    Padding positions (target 0) get 0."""
    keys = _row_keys(seed, index, epoch)
    shift = jax.vmap(lambda k: jax.random.randint(k, (targets.shape[1],), 1, n_items))(keys)
    neg = (targets - 1 + shift) % n_items + 1
    return jnp.where(targets > 0, neg, 0).astype(jnp.int32)


Negatives = Literal["sequence", "target"]


def _row_keys(seed: int, index, epoch: int):
    base = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(index))


def sequence_negatives(
    seed: int,
    index: ArrayLike,
    epoch: int,
    targets: ArrayLike,
    n_items: int,
    sequences: Sequence[ArrayLike],
) -> np.ndarray:
    """One negative item per target position, drawn uniformly from the items **not in the
    user's whole sequence** (the official ``neg_sample(set(items), item_size)``), reproducible
    from ``(seed, sample index, epoch)`` and the sample's own sequence alone.

    Args:
      seed, index, epoch: as :func:`sample_negatives` (``index`` ``[B]``: each row's sample).
      targets: ``[B, L]`` int (0 = padding: negative 0).
      n_items: items are ``1..n_items``.
      sequences: ``B`` arrays, row ``b``'s excluded items (its whole training sequence).
    Returns:
      ``[B, L]`` int32 NumPy. Exact, without rejection: the ``r``-th allowed item (``r``
      uniform in ``[0, n_items - |S|)``) is ``r + 1 + #{j : s_j - j <= r}`` for the sorted
      distinct excluded items ``s_1 < s_2 < ...`` (``j`` from 1).
    Raises:
      UserError: a sequence holds every item (no negative exists).
    """
    targets = np.asarray(targets)
    excluded = [np.unique(np.asarray(s, np.int64)) for s in sequences]
    if len(excluded) != len(targets):
        raise ValueError(f"{len(excluded)} sequences for {len(targets)} rows")
    counts = np.array([len(e) for e in excluded], np.int64)
    allowed = n_items - counts
    if (allowed < 1).any():
        raise UserError(f"sample {int(np.flatnonzero(allowed < 1)[0])} holds every item")
    u = np.asarray(
        jax.vmap(lambda k: jax.random.uniform(k, (targets.shape[1],)))(
            _row_keys(seed, index, epoch)
        ),
        np.float64,
    )
    r = np.minimum(np.floor(u * allowed[:, None]).astype(np.int64), allowed[:, None] - 1)
    stride = n_items + 2  # > any s_j - j, so the rows' segments do not overlap
    rank = [e - np.arange(1, len(e) + 1) + b * stride for b, e in enumerate(excluded)]
    flat = np.concatenate(rank) if rank else np.zeros(0, np.int64)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows = np.arange(len(targets))[:, None]
    below = np.searchsorted(flat, r + rows * stride, side="right") - start[:, None]
    neg = r + 1 + below
    return np.where(targets > 0, neg, 0).astype(np.int32)


def el2n_error(model: SASRec) -> PerSampleLoss:
    """EL2N error (Paul et al. 2021) of a SASRec sample: ``error(params, batch) -> [B]``, the
    mean over its target positions of the L2 norm of the error vector
    ``(sigmoid(pos_logit) - 1, sigmoid(neg_logit) - 0)``; 0 for a sample without positions."""

    def error(params, batch):
        pos, neg, mask = position_logits(model, params, batch)
        e = jnp.sqrt((jax.nn.sigmoid(pos) - 1.0) ** 2 + jax.nn.sigmoid(neg) ** 2)
        return jnp.sum(jnp.where(mask, e, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)

    return error


def build(cfg: SurrogateConfig, n_items: int, ds: Dataset | None = None) -> SASRec:
    """The SASRec of a ``SurrogateConfig`` (``ds`` unused: the registry's signature)."""
    return SASRec(
        n_items=n_items,
        hidden=cfg.hidden,
        blocks=cfg.blocks,
        heads=cfg.heads,
        max_len=cfg.max_len,
        dropout=cfg.dropout,
        arch=cfg.arch,
    )


def train_per_sample(
    model: SASRec,
    params: Params,
    batch: Batch,
    rng: jax.Array,
    weighting: LossWeighting = "sample",
    positions: float = 1.0,
) -> jax.Array:
    """The training objective per row, dropout on (:func:`bce_per_sample`)."""
    return bce_per_sample(*position_logits(model, params, batch, rng=rng), weighting, positions)


def item_table(params: Params) -> jax.Array:
    """The item embedding table of a SASRec-style parameter tree."""
    return params["item_emb"]["embedding"]


def item_scores(model: SASRec, params: Params, inputs: jax.Array) -> jax.Array:
    """Full-ranking scores ``[B, n_items + 1]``: the user's representation against every item
    embedding (column 0: padding)."""
    return user_representations(model, params, inputs) @ item_table(params).T


def with_negatives(
    arrays: Arrays,
    seed: int,
    epoch: int,
    n_items: int,
    cfg: SurrogateConfig | None = None,
    sequences: Sequence[ArrayLike] | None = None,
    *,
    negatives: str | None = None,
) -> Arrays:
    """``arrays`` plus one ``"negatives"`` item per target position, derived from (seed, row
    index, epoch): SASRec's, GRU4Rec's and DCRec's training data.

    Args:
      cfg: a ``SurrogateConfig``; its ``negatives`` option chooses the sampler unless
        ``negatives=`` is given (no cfg: ``"target"``).
      sequences: for ``"sequence"``, the excluded items of each row (``Dataset.train``, aligned
        with ``arrays["index"]``).
      negatives: ``"target"``: any item but the position's target (:func:`sample_negatives`);
        ``"sequence"``: an item outside the row's whole sequence (:func:`sequence_negatives`,
        as the paper's code).
    Returns:
      a new dict: ``arrays`` and ``"negatives"`` ``[N, L]``.
    """
    negatives = negatives or getattr(cfg, "negatives", "target")
    if negatives == "sequence":
        if sequences is None:
            raise ValueError("negatives='sequence' needs sequences= (the users' train items)")
        seqs = [sequences[i] for i in np.asarray(arrays["index"])]
        neg = sequence_negatives(seed, arrays["index"], epoch, arrays["targets"], n_items, seqs)
    elif negatives == "target":
        neg = sample_negatives(seed, arrays["index"], epoch, arrays["targets"], n_items)
    else:
        raise ValueError(f"negatives must be 'sequence' or 'target', got {negatives!r}")
    return {**arrays, "negatives": np.asarray(neg)}


def bce_el2n(pos: jax.Array, neg: jax.Array, mask: jax.Array) -> jax.Array:
    """EL2N error (Paul et al. 2021) of BCE-trained samples: the mean over a sample's target
    positions of the L2 norm of ``(sigmoid(pos) - 1, sigmoid(neg))``, 0 without positions (as
    :func:`el2n_error`)."""
    e = jnp.sqrt((jax.nn.sigmoid(pos) - 1.0) ** 2 + jax.nn.sigmoid(neg) ** 2)
    return jnp.sum(jnp.where(mask, e, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)


SPEC = ModelSpec(
    build=build,
    init_params=init_params,
    make_loss_fns=make_loss_fns,
    train_per_sample=train_per_sample,
    item_scores=item_scores,
    user_representations=user_representations,
    training_data=with_negatives,
    el2n_error=el2n_error,
    weighted=True,
    sample_loss=per_user_loss,
)
