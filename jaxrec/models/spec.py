"""The contract every surrogate meets: :class:`ModelSpec`, the functions of one model, each
typed by a Protocol (the shapes :mod:`jaxrec.models` documents). A model module (``sasrec``,
``gru4rec``, ...) imports this module and defines ``SPEC``; the registry (:mod:`jaxrec.models`)
imports the model modules, so no model imports the registry.

Arguments are positional-only in the Protocols: each model names them its own way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import jax
import numpy as np

from jaxrec.base import Batch, Params, PerSampleLoss, Loss

#: A built Flax module of :data:`jaxrec.models.MODELS`. ``Any``: each model's functions take
#: their own class, which a Protocol over ``flax.linen.Module`` would not accept.
Model: TypeAlias = Any
#: Host arrays of every training user, ``{"inputs", "targets", "index", ...}`` ``[N, L]``.
Arrays: TypeAlias = dict[str, np.ndarray]


class Build(Protocol):
    """``build(cfg, n_items, ds=None) -> model``: the model of a ``SurrogateConfig`` (``ds``:
    the dataset, for DCRec's item graphs)."""

    def __call__(self, cfg: Any, n_items: int, ds: Any = None, /) -> Model: ...


class InitParams(Protocol):
    """``init_params(model, key) -> params``."""

    def __call__(self, model: Model, key: jax.Array, /) -> Params: ...


class MakeLossFns(Protocol):
    """``make_loss_fns(model) -> (loss, per_sample_loss)``, deterministic (no dropout): the
    influence contract (:mod:`jaxrec.base`). A ``weighted`` model's also takes
    ``(weighting, positions)`` (``SurrogateConfig.loss_weighting``)."""

    def __call__(
        self, model: Model, /, *args: Any, **kwargs: Any
    ) -> tuple[Loss, PerSampleLoss]: ...


class TrainPerSample(Protocol):
    """``train_per_sample(model, params, batch, rng) -> [B]``: the training objective per row,
    dropout on (a ``weighted`` model's also takes ``(weighting, positions)``)."""

    def __call__(
        self, model: Model, params: Params, batch: Batch, rng: jax.Array, /, *args: Any, **kw: Any
    ) -> jax.Array: ...


class ApplyToInputs(Protocol):
    """``f(model, params, inputs [B, L]) -> [B, D]``: item scores (``D = n_items + 1``, column
    0 padding) or user representations."""

    def __call__(self, model: Model, params: Params, inputs: Any, /) -> jax.Array: ...


def forward(model: Model, params: Params, *args: Any, rngs: Any = None) -> Any:
    """``model.apply({"params": params}, *args, rngs=rngs)``: the output of the model's
    ``__call__`` (Flax types ``apply`` as that output or, with ``mutable``, a tuple with the
    updated collections; no surrogate uses ``mutable``)."""
    return model.apply({"params": params}, *args, rngs=rngs)


class TrainingData(Protocol):
    """``training_data(arrays, seed, epoch, n_items, cfg=None, sequences=None) -> arrays``:
    the batch arrays of one epoch (negatives, BERT4Rec's masks), derived from (seed, row
    index, epoch)."""

    def __call__(
        self,
        arrays: Arrays,
        seed: int,
        epoch: int,
        n_items: int,
        cfg: Any,
        sequences: Any = None,
        /,
    ) -> Arrays: ...


class PerSampleOf(Protocol):
    """``f(model) -> g(params, batch) -> [B]``: a per-row function of a built model (EL2N's
    error, the per-user sample loss)."""

    def __call__(self, model: Model, /) -> PerSampleLoss: ...


@dataclass(frozen=True)
class ModelSpec:
    """The functions of one surrogate (see :mod:`jaxrec.models` for what each returns).

    Attributes:
      weighted: ``make_loss_fns`` / ``train_per_sample`` take ``(weighting, positions)``.
      sampled_negatives: its loss reads ``batch["negatives"]`` (``--negative-draws``).
      sample_loss: the per-user loss (``g_i`` of paper Eq. 11) where it differs from
        ``make_loss_fns``' per-sample loss; ``None``: the same.
    """

    build: Build
    init_params: InitParams
    make_loss_fns: MakeLossFns
    train_per_sample: TrainPerSample
    item_scores: ApplyToInputs
    user_representations: ApplyToInputs
    training_data: TrainingData
    el2n_error: PerSampleOf
    weighted: bool = False
    sampled_negatives: bool = True
    sample_loss: PerSampleOf | None = None
