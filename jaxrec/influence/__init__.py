"""The influence engine: DEALRec influence scores (paper Eq. 9-11, Algorithm 1) for any pytree
model given pure ``loss(params, batch) -> scalar`` and ``per_sample_loss(params, batch) -> [B]``.

    hv = hvp(loss, params, batch, v)                        # H v, forward-over-reverse
    u  = inverse_hvp(loss, params, data, v, solver="cg", damping=lam)   # (H + lam I)^-1 v
    u  = inverse_hvp(loss, params, data, v, solver=LissaOptions(steps=2000), damping=lam)
    s  = sample_scores(per_sample_loss, params, data, u)    # g_i . u, one JVP per batch
    s, info = dealrec_scores(loss, per_sample_loss, sample_loss, params, data, cfg)  # the stage

Data: a pytree with a leading row axis, or :class:`~jaxrec.influence.batching.Strata` (strata
that know their order: per-row results come back in the data set's order).
Train x query attribution with every estimator (exact, CG, LiSSA, Arnoldi, grad-dot, grad-cos,
K-FAC, EK-FAC, TRAK, TracIn-CP, DataInf): :mod:`jaxrec.influence.attribution`.
"""

from jaxrec.influence.hvp import hvp
from jaxrec.influence_options import ArnoldiOptions, CGOptions, ExactOptions, LissaOptions
from jaxrec.influence.inverse import CONVENTIONS, SOLVERS, inverse_hvp, inverse_hvp_with_info
from jaxrec.influence.batching import Strata
from jaxrec.influence.params import ParamSubset, parameter_paths
from jaxrec.influence.dealrec import dealrec_scores
from jaxrec.influence.scores import (
    el2n_scores,
    grand_scores,
    influence_scores,
    mean_gradient,
    per_sample_map,
    sample_scores,
)

__all__ = [
    "hvp",
    "inverse_hvp",
    "inverse_hvp_with_info",
    "SOLVERS",
    "CONVENTIONS",
    "ParamSubset",
    "Strata",
    "parameter_paths",
    "sample_scores",
    "mean_gradient",
    "influence_scores",
    "dealrec_scores",
    "grand_scores",
    "el2n_scores",
    "per_sample_map",
    "LissaOptions",
    "CGOptions",
    "ExactOptions",
    "ArnoldiOptions",
]
