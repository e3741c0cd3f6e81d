"""The attributions ``dealrec lds`` compares: each name of :data:`ATTRIBUTIONS` -> the options
of one :mod:`jaxrec.influence.attribution` estimator, built from :class:`LdsConfig`.

Nothing here computes an influence: the study fits each estimator once and scores every
training user against every chosen validation user with the library
(:func:`jaxrec.influence.attribution.fit` / :func:`~jaxrec.influence.attribution.attribute`),
and the ``dealrec`` row is the influence stage's own score
(:func:`jaxrec.influence.dealrec.dealrec_scores`). The solver options carry the names of
``dealrec influence``'s (``steps``, ``lissa_batch_size``, ``lissa_tol``, ``tol``, ``maxiter``,
``rank``, ``iterations``) and are the same nested typed objects (``cfg.lissa``, ``cfg.cg``,
``cfg.exact``, ``cfg.arnoldi``: :class:`~jaxrec.config.LissaOptions`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxrec.base import Loss, Params, PerSampleLoss
from jaxrec.config import InfluenceConfig, LdsConfig
from jaxrec.errors import UserError
from jaxrec.influence import attribution as at
from jaxrec.influence.dealrec import dealrec_scores
from jaxrec.influence.tracin import TracInOptions


def _influence(cfg: LdsConfig, solver: Any, damping: float | None = None) -> at.InfluenceOptions:
    return at.InfluenceOptions(
        solver=solver,
        damping=cfg.damping if damping is None else damping,
        convention=cfg.convention,
        scale=cfg.scale,
    )


# name -> the estimator's options under an LDS config (``dealrec`` is the stage's own score)
ESTIMATORS: dict[str, Callable[[LdsConfig], Any]] = {
    "exact": lambda c: _influence(c, c.exact),
    "cg": lambda c: _influence(c, c.cg),
    "lissa": lambda c: _influence(c, c.lissa),
    "lissa-small": lambda c: _influence(c, c.lissa, c.small_damping),
    "arnoldi": lambda c: _influence(c, c.arnoldi),
    "grad-dot": lambda c: at.GradDotOptions(),
    "grad-cos": lambda c: at.GradCosOptions(),
    "kfac": lambda c: c.kfac,
    "ekfac": lambda c: c.ekfac,
    "trak": lambda c: c.trak,
    "tracin": lambda c: TracInOptions(),
    "datainf": lambda c: c.datainf,
}
ATTRIBUTIONS = (*ESTIMATORS, "dealrec")


def estimator_options(name: str, cfg: LdsConfig) -> Any:
    """The library options of attribution ``name`` (not ``dealrec``) under ``cfg``."""
    if name not in ESTIMATORS:
        raise UserError(f"unknown attribution {name!r}; expected one of {', '.join(ATTRIBUTIONS)}")
    return ESTIMATORS[name](cfg)


def influence_config(cfg: LdsConfig) -> InfluenceConfig:
    """The :class:`InfluenceConfig` of the ``dealrec`` row: the influence stage's defaults with
    ``cfg``'s parameter block, solver settings (LiSSA), negative draws and sample loss."""
    return InfluenceConfig(
        solver="lissa",
        params=cfg.params,
        convention=cfg.convention,
        damping=cfg.damping,
        scale=cfg.scale,
        lissa=cfg.lissa,
        seed=cfg.seed,
        negative_draws=cfg.negative_draws,
        sample_loss=cfg.sample_loss,
    )


def estimator_attribution(
    options: Any,
    loss: Loss,
    per_sample_loss: PerSampleLoss,
    params: Params | at.Checkpoints,
    train: Any,
    query: Any,
    *,
    progress: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """``(a [n, v], info)``: one estimator fitted on ``train`` and scored against every row of
    ``query`` (:func:`jaxrec.influence.attribution.fit` then ``attribute``); ``train`` may be
    :class:`~jaxrec.influence.batching.Strata`, whose rows come back in user order. ``info``:
    seconds and peak memory of the fit and the scoring."""
    state = at.fit(options, loss, per_sample_loss, params, train, progress=progress)
    return at.attribute_with_info(state, train, query, progress=progress)


def dealrec_attribution(
    loss: Loss,
    per_sample_loss: PerSampleLoss,
    sample_loss: PerSampleLoss,
    params: Params,
    data: dict,
    n_val: int,
    cfg: InfluenceConfig,
    *,
    draw: Callable[[int], np.ndarray] | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """The DEALRec score (paper Eq. 11) ``g_i . H^-1 g_mean / n^2`` exactly as the pipeline's
    influence stage computes it (:func:`jaxrec.influence.dealrec.dealrec_scores`, same
    arguments: full ``params``, user-order ``data``, ``draw`` for the negative draws),
    repeated for each of the ``n_val`` validation users: it targets the training risk, not a
    validation loss. Returns ``([n, n_val] in user order, info)`` with its seconds and peak
    memory."""
    info: dict = {}
    with at.measured(info, "total"):
        s, _ = dealrec_scores(
            loss, per_sample_loss, sample_loss, params, data, cfg, draw=draw, progress=progress
        )
    return np.repeat(np.asarray(s, np.float64)[:, None], n_val, 1), info
