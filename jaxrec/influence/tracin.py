"""TracIn-CP (Pruthi et al. 2020, "Estimating training data influence by tracing gradient
descent", Eq. 3): ``a[i, j] = sum_c eta_c g_i(theta_c) . g_j(theta_c)`` over saved checkpoints
``theta_c`` with the learning rate ``eta_c`` in force there.

Nothing is fitted: each checkpoint costs the query gradients and one pairwise JVP pass over
the training samples (:func:`jaxrec.influence.attribution.pairwise_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxrec.config_io import option
from jaxrec.errors import UserError
from jaxrec.influence.batching import Data
from jaxrec.influence.pairwise import Checkpoints, State, pairwise_scores, query_gradients


@dataclass(frozen=True)
class TracInOptions:
    """TracIn-CP over :class:`~jaxrec.influence.pairwise.Checkpoints` (params + learning
    rates)."""

    batch_size: int = option(4096, "training samples per scoring batch")
    query_batch_size: int = option(64, "query samples per gradient batch")


ESTIMATORS = {TracInOptions: "tracin"}


def fit_state(state: State, progress: bool | None = None) -> dict:
    """Checks the checkpoints; nothing to precompute (Eq. 3 is a sum of gradient products)."""

    ck = state.params
    if not isinstance(ck, Checkpoints) or ck.learning_rates is None:
        raise UserError(
            "TracIn needs params=Checkpoints(params=[...], learning_rates=[...]) "
            "(the saved checkpoints and the learning rate at each)"
        )
    return {}


def attribute(
    state: State, train: Data, query: Data, query_mean: bool, progress: bool | None = None
) -> np.ndarray:
    """Eq. 3: the learning-rate-weighted sum over checkpoints of gradient dot products."""

    ck = state.params
    total = None
    for params, lr in zip(ck.params, ck.learning_rates):
        g = query_gradients(state, query, query_mean=query_mean, params=params)
        a = lr * pairwise_scores(
            state.per_sample_loss, params, train, g, state.options.batch_size, progress=progress
        )
        total = a if total is None else total + a
    assert total is not None  # Checkpoints holds at least one
    return total
