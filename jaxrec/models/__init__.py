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

from jaxrec.models import bert4rec, dcrec, gru4rec, sasrec
from jaxrec.models.sasrec import bce_el2n, with_negatives
from jaxrec.models.spec import Model, ModelSpec, PerSampleLoss

#: the registry: ``SurrogateConfig.model`` -> the model's :class:`ModelSpec`
SPECS: dict[str, ModelSpec] = {
    "sasrec": sasrec.SPEC,
    "gru4rec": gru4rec.SPEC,
    "bert4rec": bert4rec.SPEC,
    "dcrec": dcrec.SPEC,
}
MODELS = tuple(SPECS)


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of surrogate ``name`` (one of :data:`MODELS`).

    Args:
      name: ``SurrogateConfig.model``.
    Returns:
      the model module's ``SPEC``.
    """
    if name not in SPECS:
        raise ValueError(f"model={name!r}: choose one of {', '.join(MODELS)}")
    return SPECS[name]


def spec_of(model: Model) -> ModelSpec:
    """The :class:`ModelSpec` of a built Flax model (by the module that defines its class)."""
    return spec(type(model).__module__.rsplit(".", 1)[-1])


def sample_loss(model: Model) -> PerSampleLoss:
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


__all__ = [
    "MODELS",
    "SPECS",
    "ModelSpec",
    "bce_el2n",
    "sample_loss",
    "spec",
    "spec_of",
    "with_negatives",
]
