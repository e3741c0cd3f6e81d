"""Flax surrogate recommenders, each exposed as pure ``loss`` / ``per_sample_loss`` functions.

One registry, :data:`MODELS`, names every surrogate ``SurrogateConfig.model`` may choose; its
:class:`ModelSpec` holds the few functions training, evaluation and the influence stage need, so
``jaxrec.train`` dispatches through :func:`spec` and never names a model. Every model takes the
same batch ``{"inputs", "targets", "negatives"}`` (``[B, L]`` int32, left-padded with 0), so the
length buckets, the influence engine and the score files are shared unchanged.

    s = spec("gru4rec")
    model = s.build(cfg, n_items, ds); params = s.init_params(model, key)  # ds: DCRec's graphs
    loss, per_sample_loss = s.make_loss_fns(model)          # deterministic, the influence contract
    s.train_per_sample(model, params, batch, rng) -> [B]   # dropout on: the training objective
    s.item_scores(model, params, inputs) -> [B, n_items + 1]  # full ranking (column 0: padding)
    s.user_representations(model, params, inputs) -> [B, D]
    s.training_data(arrays, seed, epoch, n_items, cfg, sequences=None) -> batch arrays
    s.el2n_error(model) -> error(params, batch) -> [B]
    sample_loss(model) -> per_user_loss(params, batch) -> [B]  # g_i of the influence score

``sample_loss(model)`` (:func:`sample_loss`) is the per-sample loss that scores a user (paper
Eq. 11's ``g_i``): the loss the model's paper code computes for that user on a batch of one.
It is ``s.sample_loss(model)`` where the model's training loss gives a user another weight
(SASRec: ``trainers.cross_entropy`` on a batch of one is the mean over the user's target
positions, while the ``"position"`` training loss sums them over a constant), else the
training ``per_sample_loss`` itself (GRU4Rec, BERT4Rec, DCRec: already a per-user mean).

``s.weighted`` marks a model whose ``make_loss_fns`` / ``train_per_sample`` take the extra
``(weighting, positions)`` of ``SurrogateConfig.loss_weighting`` (SASRec: the paper code's
per-position weighting); ``jaxrec.train.loss_fns`` and ``make_train_step`` pass them.
``s.sampled_negatives`` is False for a model whose loss has no sampled negatives (BERT4Rec):
the influence stage's ``--negative-draws`` then scores it with its one fixed draw.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from collections.abc import Callable

MODELS = ("sasrec", "gru4rec", "bert4rec", "dcrec")


@dataclass(frozen=True)
class ModelSpec:
    """The functions of one surrogate (see the module docstring for their signatures)."""

    build: Callable
    init_params: Callable
    make_loss_fns: Callable
    train_per_sample: Callable
    item_scores: Callable
    user_representations: Callable
    training_data: Callable
    el2n_error: Callable
    weighted: bool = False
    sampled_negatives: bool = True  # its loss reads batch["negatives"] (--negative-draws)
    # sample_loss(model) -> per-user loss [B], where it differs from make_loss_fns' per-sample
    sample_loss: Callable | None = None


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of surrogate ``name`` (one of :data:`MODELS`).

    Args:
      name: ``SurrogateConfig.model``.
    Returns:
      the model module's ``SPEC``.
    """
    if name not in MODELS:
        raise ValueError(f"model={name!r}: choose one of {', '.join(MODELS)}")
    if name == "sasrec":
        return _sasrec_spec()
    return importlib.import_module(f"jaxrec.models.{name}").SPEC


def spec_of(model) -> ModelSpec:
    """The :class:`ModelSpec` of a built Flax model (by the module that defines its class)."""
    return spec(type(model).__module__.rsplit(".", 1)[-1])


def sample_loss(model) -> Callable:
    """The per-user sample loss of a built model: ``(params, batch) -> [B]``, each user's loss
    as the model's paper code computes it on a batch of one (the ``g_i`` of paper Eq. 11 under
    ``influence.sample_loss: per-user``).

    Args:
      model: a Flax model of :data:`MODELS` (from ``spec(name).build``).
    Returns:
      SASRec: the mean over the user's target positions of ``-log s(pos) - log(1 - s(neg))``
      (official ``trainers.get_sample_loss`` -> ``cross_entropy``, whose divisor is the
      batch's number of target positions: on a batch of one, the user's own); the other
      models: their training ``per_sample_loss`` (already a per-user mean, see
      docs/surrogates.md). Build it once per model: each call makes a new function (and new
      jit compilations).
    """
    s = spec_of(model)
    if s.sample_loss is not None:
        return s.sample_loss(model)
    return s.make_loss_fns(model)[1]


def _sasrec_spec() -> ModelSpec:
    from jaxrec.models import sasrec

    def build(cfg, n_items, ds=None):
        return sasrec.SASRec(
            n_items=n_items,
            hidden=cfg.hidden,
            blocks=cfg.blocks,
            heads=cfg.heads,
            max_len=cfg.max_len,
            dropout=cfg.dropout,
            arch=cfg.arch,
        )

    def train_per_sample(model, params, batch, rng, weighting="sample", positions=1.0):
        logits = sasrec.position_logits(model, params, batch, rng=rng)
        return sasrec.bce_per_sample(*logits, weighting, positions)

    def item_scores(model, params, inputs):
        return sasrec.user_representations(model, params, inputs) @ sasrec_table(params).T

    return ModelSpec(
        build=build,
        init_params=sasrec.init_params,
        make_loss_fns=sasrec.make_loss_fns,
        train_per_sample=train_per_sample,
        item_scores=item_scores,
        user_representations=sasrec.user_representations,
        training_data=with_negatives,
        el2n_error=sasrec.el2n_error,
        weighted=True,
        sample_loss=sasrec.per_user_loss,
    )


def sasrec_table(params):
    """The item embedding table of a SASRec-style parameter tree."""
    return params["item_emb"]["embedding"]


def with_negatives(
    arrays: dict,
    seed: int,
    epoch: int,
    n_items: int,
    cfg=None,
    sequences=None,
    *,
    negatives: str | None = None,
) -> dict:
    """``arrays`` plus one ``"negatives"`` item per target position, derived from (seed, row
    index, epoch): SASRec's and GRU4Rec's training data.

    Args:
      cfg: a ``SurrogateConfig``; its ``negatives`` option chooses the sampler unless
        ``negatives=`` is given (no cfg: ``"target"``).
      sequences: for ``"sequence"``, the excluded items of each row (``Dataset.train``, aligned
        with ``arrays["index"]``).
      negatives: ``"target"``: any item but the position's target
        (:func:`jaxrec.models.sasrec.sample_negatives`); ``"sequence"``: an item outside the
        row's whole sequence (:func:`jaxrec.models.sasrec.sequence_negatives`, as the paper's
        code).
    """
    import numpy as np

    from jaxrec.models import sasrec

    negatives = negatives or getattr(cfg, "negatives", "target")
    if negatives == "sequence":
        if sequences is None:
            raise ValueError("negatives='sequence' needs sequences= (the users' train items)")
        seqs = [sequences[i] for i in np.asarray(arrays["index"])]
        neg = sasrec.sequence_negatives(
            seed, arrays["index"], epoch, arrays["targets"], n_items, seqs
        )
    elif negatives == "target":
        neg = sasrec.sample_negatives(seed, arrays["index"], epoch, arrays["targets"], n_items)
    else:
        raise ValueError(f"negatives must be 'sequence' or 'target', got {negatives!r}")
    return {**arrays, "negatives": np.asarray(neg)}


def bce_el2n(pos, neg, mask):
    """EL2N error (Paul et al. 2021) of BCE-trained samples: the mean over a sample's target
    positions of the L2 norm of ``(sigmoid(pos) - 1, sigmoid(neg))``, 0 without positions (as
    :func:`jaxrec.models.sasrec.el2n_error`)."""
    import jax
    import jax.numpy as jnp

    e = jnp.sqrt((jax.nn.sigmoid(pos) - 1.0) ** 2 + jax.nn.sigmoid(neg) ** 2)
    return jnp.sum(jnp.where(mask, e, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)


__all__ = ["MODELS", "bce_el2n", "ModelSpec", "sample_loss", "spec", "spec_of", "with_negatives"]
