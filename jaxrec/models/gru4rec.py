"""GRU4Rec (Hidasi et al., ICLR 2016; the sequential next-item variant of Hidasi & Karatzoglou,
CIKM 2018 and RecBole) in Flax, under the same pure-loss contract as SASRec.

Item embedding -> dropout -> one GRU layer -> dense to the embedding size; the state at
position ``t`` scores the next item ``targets[t]`` against one sampled negative with the BCE
loss of SASRec (:func:`jaxrec.models.sasrec.bce_per_sample`), negatives from (seed, sample index,
epoch) exactly as SASRec's. Departures: the session-parallel mini-batches and the TOP1 / BPR-max
losses of the original are replaced by per-user sequences and SASRec's sampled BCE (so that the
surrogates differ in their encoder only); RecBole's GRU4Rec uses full-softmax cross-entropy.

Sequences are left-padded; the GRU skips padding (the state stays at its zero start until the
first item), so a batch cut to any width that holds its sequences gives exactly the same
numbers, and a sample's loss depends on its own row only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.config import SurrogateConfig
from jaxrec.data import Dataset
from jaxrec.base import Batch, Loss, Params, PerSampleLoss
from jaxrec.models.sasrec import bce_el2n, bce_per_sample, with_negatives
from jaxrec.models.spec import ModelSpec, forward


class _MaskedGRUStep(nn.Module):
    """One GRU step that keeps the state unchanged at padding positions."""

    hidden: int

    @nn.compact
    def __call__(self, carry, xs):
        x, valid = xs
        new, _ = nn.GRUCell(self.hidden, name="cell")(carry, x)
        carry = jnp.where(valid[:, None], new, carry)
        return carry, carry


class GRU4Rec(nn.Module):
    """Embedding, dropout, a padding-skipping GRU, and a dense projection back to item space."""

    n_items: int
    hidden: int = 64
    max_len: int = 50
    dropout: float = 0.5

    def setup(self) -> None:
        init = nn.initializers.xavier_normal()
        self.item_emb = nn.Embed(
            self.n_items + 1, self.hidden, embedding_init=init, name="item_emb"
        )
        scan = nn.scan(
            _MaskedGRUStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
        )
        self.gru = scan(self.hidden, name="gru")
        self.out = nn.Dense(self.hidden, name="out")
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, inputs, deterministic: bool = True):
        """Hidden state of every position: ``[B, L] int -> [B, L, hidden]`` (0 at padding)."""
        valid = inputs > 0
        x = self.drop(self.item_emb(inputs), deterministic=deterministic)
        carry = jnp.zeros((inputs.shape[0], self.hidden), x.dtype)
        _, states = self.gru(carry, (x, valid))
        return self.out(states) * valid[..., None]


def build(cfg: SurrogateConfig, n_items: int, ds: Dataset | None = None) -> GRU4Rec:
    """The model of a :class:`jaxrec.config.SurrogateConfig` (``hidden``, ``max_len``,
    ``dropout``; one GRU layer as RecBole's default, ``blocks`` / ``heads`` unused)."""
    return GRU4Rec(n_items=n_items, hidden=cfg.hidden, max_len=cfg.max_len, dropout=cfg.dropout)


def init_params(model: GRU4Rec, key: jax.Array) -> Params:
    """Initial parameters of ``model``."""
    return model.init(key, jnp.ones((1, model.max_len), jnp.int32))["params"]


def position_logits(
    model: GRU4Rec, params: Params, batch: Batch, *, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Target and negative logits at every position, ``(pos, neg, mask)`` each ``[B, L]``; with
    ``rng`` dropout is on."""
    deterministic = rng is None
    rngs = None if deterministic else {"dropout": rng}
    # rng is not None where rngs is built: mypy does not narrow through ``deterministic``
    h = model.apply({"params": params}, batch["inputs"], deterministic, rngs=rngs)  # type: ignore[arg-type]
    table = params["item_emb"]["embedding"]
    pos = jnp.sum(h * table[batch["targets"]], -1)
    neg = jnp.sum(h * table[batch["negatives"]], -1)
    return pos, neg, batch["targets"] > 0


def make_loss_fns(model: GRU4Rec) -> tuple[Loss, PerSampleLoss]:
    """The pure ``(loss, per_sample_loss)`` pair (deterministic): per sample, the mean BCE over
    its target positions (as SASRec, paper Eq. 9-10's training loss); ``loss`` is their mean."""

    def per_sample_loss(params, batch):
        return bce_per_sample(*position_logits(model, params, batch))

    def loss(params, batch):
        return jnp.mean(per_sample_loss(params, batch))

    return loss, per_sample_loss


def train_per_sample(model: GRU4Rec, params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
    """The per-sample training loss with dropout on (key ``rng``)."""
    return bce_per_sample(*position_logits(model, params, batch, rng=rng))


def user_representations(model: GRU4Rec, params: Params, inputs: jax.Array) -> jax.Array:
    """The projected GRU state after the newest item ``[B, hidden]``."""
    return forward(model, params, inputs, True)[:, -1, :]


def item_scores(model: GRU4Rec, params: Params, inputs: jax.Array) -> jax.Array:
    """Scores of every item ``[B, n_items + 1]`` for full ranking."""
    return user_representations(model, params, inputs) @ params["item_emb"]["embedding"].T


def el2n_error(model: GRU4Rec) -> PerSampleLoss:
    """EL2N error (Paul et al. 2021) of a sample, as :func:`jaxrec.models.sasrec.el2n_error`."""

    def error(params, batch):
        return bce_el2n(*position_logits(model, params, batch))

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
