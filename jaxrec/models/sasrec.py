"""SASRec (Kang & McAuley, 2018) in Flax: the surrogate recommender of DEALRec (paper Sec. 3.2).

The model is exposed through pure functions, which is all the influence engine needs::

    loss, per_sample_loss = make_loss_fns(model)
    per_sample_loss(params, batch) -> [B]      # one BCE loss per training sample (user)
    loss(params, batch) -> scalar              # their mean

A batch is ``{"inputs", "targets", "negatives"}``, each ``[B, L]`` int32, left-padded with 0:
at every non-padding position the model is asked to score the target (the next item) above the
negative. Positions are absolute from the right (the newest item always has position
``max_len - 1``) and attention masks padding keys, so a batch may be cut to any width ``L <=
max_len`` that holds its longest sequence and gives exactly the same numbers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_NEG = -1e9  # attention mask value: finite, so fully-masked (padding) rows stay NaN-free


class SASRec(nn.Module):
    """Self-attentive sequential recommender: item + position embeddings, causal blocks."""

    n_items: int
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.5

    def setup(self):
        # Xavier-normal embeddings as in the reference SASRec code (Flax's default std 1.0,
        # times sqrt(hidden), would swamp the positional signal)
        init = nn.initializers.xavier_normal()
        self.item_emb = nn.Embed(
            self.n_items + 1, self.hidden, embedding_init=init, name="item_emb"
        )
        self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=init, name="pos_emb")
        self.attn_ln = [nn.LayerNorm(epsilon=1e-8, name=f"attn_ln_{i}") for i in range(self.blocks)]
        self.query = [nn.Dense(self.hidden, name=f"query_{i}") for i in range(self.blocks)]
        self.key_value = [
            nn.Dense(2 * self.hidden, name=f"key_value_{i}") for i in range(self.blocks)
        ]
        self.attn_out = [nn.Dense(self.hidden, name=f"attn_out_{i}") for i in range(self.blocks)]
        self.ffn_ln = [nn.LayerNorm(epsilon=1e-8, name=f"ffn_ln_{i}") for i in range(self.blocks)]
        self.ffn_1 = [nn.Dense(self.hidden, name=f"ffn_1_{i}") for i in range(self.blocks)]
        self.ffn_2 = [nn.Dense(self.hidden, name=f"ffn_2_{i}") for i in range(self.blocks)]
        self.last_ln = nn.LayerNorm(epsilon=1e-8, name="last_ln")
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, inputs, deterministic: bool = True):
        """Hidden state of every position: ``[B, L] int -> [B, L, hidden]``."""
        width = inputs.shape[1]
        valid = (inputs > 0)[..., None]
        x = self.item_emb(inputs) * jnp.sqrt(self.hidden).astype(jnp.float32)
        x = x + self.pos_emb(jnp.arange(self.max_len - width, self.max_len))[None]
        x = self.drop(x, deterministic=deterministic) * valid
        causal = jnp.tril(jnp.ones((width, width), bool))
        mask = causal[None, None] & (inputs > 0)[:, None, None, :]  # [B, 1, Lq, Lk]
        head_dim = self.hidden // self.heads
        for i in range(self.blocks):
            q_in = self.attn_ln[i](x)
            q = self.query[i](q_in)
            k, v = jnp.split(self.key_value[i](x), 2, axis=-1)
            split = lambda t: t.reshape(*t.shape[:2], self.heads, head_dim)
            logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(head_dim)
            probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1)
            probs = self.drop(probs, deterministic=deterministic)
            attn = jnp.einsum("bhqk,bkhd->bqhd", probs, split(v)).reshape(x.shape)
            x = q_in + self.attn_out[i](attn)
            y = self.ffn_ln[i](x)
            h = self.drop(nn.relu(self.ffn_1[i](y)), deterministic=deterministic)
            x = y + self.drop(self.ffn_2[i](h), deterministic=deterministic)
            x = x * valid
        return self.last_ln(x)

    def item_embeddings(self):
        """The item embedding table ``[n_items + 1, hidden]`` (row 0 is padding)."""
        return self.item_emb.embedding


def init_params(model: SASRec, key) -> dict:
    """Initial parameters of ``model``."""
    return model.init(key, jnp.ones((1, model.max_len), jnp.int32))["params"]


def position_logits(model: SASRec, params, batch, *, rng=None):
    """Target and negative logits at every position (paper's surrogate objective).

    Returns ``(pos_logits, neg_logits, mask)``, each ``[B, L]``; ``mask`` marks the positions
    that have a target. With ``rng`` given, dropout is on (training); else deterministic.
    """
    deterministic = rng is None
    rngs = None if deterministic else {"dropout": rng}
    h = model.apply({"params": params}, batch["inputs"], deterministic, rngs=rngs)
    table = params["item_emb"]["embedding"]
    pos = jnp.sum(h * table[batch["targets"]], -1)
    neg = jnp.sum(h * table[batch["negatives"]], -1)
    return pos, neg, batch["targets"] > 0


def bce_per_sample(pos, neg, mask):
    """Mean over a sample's positions of ``-log s(pos) - log(1 - s(neg))`` (0 if none)."""
    terms = jax.nn.softplus(-pos) + jax.nn.softplus(neg)
    count = jnp.sum(mask, -1)
    return jnp.sum(jnp.where(mask, terms, 0.0), -1) / jnp.maximum(count, 1)


def make_loss_fns(model: SASRec):
    """The pure ``(loss, per_sample_loss)`` pair of ``model`` (deterministic: no dropout).

    ``per_sample_loss(params, batch) -> [B]`` is the BCE loss of each user's sample;
    ``loss(params, batch)`` is its mean: the training objective whose Hessian the influence
    engine inverts (paper Eq. 9-10).
    """

    def per_sample_loss(params, batch):
        return bce_per_sample(*position_logits(model, params, batch))

    def loss(params, batch):
        return jnp.mean(per_sample_loss(params, batch))

    return loss, per_sample_loss


def user_representations(model: SASRec, params, inputs):
    """The hidden state at the newest position ``[B, hidden]``: the user's representation,
    scored against item embeddings for full ranking."""
    return model.apply({"params": params}, inputs, True)[:, -1, :]


def sample_negatives(seed: int, index, epoch: int, targets, n_items: int):
    """One negative item per target position, never equal to the target, reproducible from
    ``(seed, sample index, epoch)`` alone, so any sample's loss can be recomputed on its own.
    Padding positions (target 0) get 0."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(index))
    shift = jax.vmap(lambda k: jax.random.randint(k, (targets.shape[1],), 1, n_items))(keys)
    neg = (targets - 1 + shift) % n_items + 1
    return jnp.where(targets > 0, neg, 0).astype(jnp.int32)


def el2n_error(model: SASRec):
    """EL2N error (Paul et al. 2021) of a SASRec sample: ``error(params, batch) -> [B]``, the
    mean over its target positions of the L2 norm of the error vector
    ``(sigmoid(pos_logit) - 1, sigmoid(neg_logit) - 0)``; 0 for a sample without positions."""

    def error(params, batch):
        pos, neg, mask = position_logits(model, params, batch)
        e = jnp.sqrt((jax.nn.sigmoid(pos) - 1.0) ** 2 + jax.nn.sigmoid(neg) ** 2)
        return jnp.sum(jnp.where(mask, e, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)

    return error
