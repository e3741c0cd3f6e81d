"""The function contracts every second-order routine builds on (optax's ``base.py`` is the model).

A surrogate reaches the influence engine, the selectors and the LDS harness only as pure
functions of ``(params, batch)``:

    loss(params, batch) -> scalar            the training objective (the mean gradient v, HVPs)
    per_sample_loss(params, batch) -> [B]    one loss per row (each row's gradient g_s, Eq. 9-11)

Solvers, estimators and selectors take these functions, never a model object.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias
from collections.abc import Mapping

import jax

#: A pytree of arrays: a Flax ``params`` dict, or any vector in parameter space (``u = H^-1 v``).
Params: TypeAlias = Any
#: A pytree of arrays sharing a leading batch axis ``B`` (``{"seq": [B, L], "pos": ..., ...}``).
Batch: TypeAlias = Mapping[str, Any]
#: A host array or a device array.
ArrayLike: TypeAlias = Any


class Loss(Protocol):
    """``loss(params, batch) -> scalar``: the objective whose Hessian the solvers invert."""

    def __call__(self, params: Params, batch: Batch) -> jax.Array: ...

    # Declared so that a loss can key a cache (``functools.lru_cache`` in
    # ``jaxrec.influence.scores``): mypy does not count ``object.__hash__`` as a protocol member.
    def __hash__(self) -> int: ...


class PerSampleLoss(Protocol):
    """``per_sample_loss(params, batch) -> [B]``: one loss per row of ``batch``; the gradient of
    row ``s``'s entry is the per-sample gradient ``g_s`` of Eq. 9-11."""

    def __call__(self, params: Params, batch: Batch) -> jax.Array: ...

    # Declared so that a loss can key a cache (``functools.lru_cache`` in
    # ``jaxrec.influence.scores``): mypy does not count ``object.__hash__`` as a protocol member.
    def __hash__(self) -> int: ...


class HVP(Protocol):
    """``hvp(v) -> H v`` for a fixed ``params`` and data: a linear operator on parameter space."""

    def __call__(self, vector: Params) -> Params: ...
