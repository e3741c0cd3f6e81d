"""Linear datamodeling score (LDS) of influence approximations (``dealrec lds``).

The protocol of Ilyas et al. 2022 ("Datamodels: predicting predictions from training data") as
used to score attribution methods by Park et al. 2023 (TRAK, "linear datamodeling score"):

1. draw ``M`` random subsets ``S_m`` holding a fraction ``alpha`` of the training samples
   (:func:`jaxrec.lds.stats.draw_subsets`);
2. retrain from the same initialisation on each subset, with several training seeds per subset
   whose losses are averaged (removes training noise), and measure each validation user's loss
   ``L_j(S_m)`` (:func:`jaxrec.lds.study.retrained_losses`: cached one file per retrain, so a
   killed run continues, and computed once for every attribution);
3. from an attribution matrix ``a[i, j]`` (training sample ``i``, validation user ``j``; large
   positive = up-weighting ``i`` lowers ``L_j``) predict ``f_j(S) = -sum_{i in S} a[i, j]``
   (:func:`jaxrec.lds.stats.predictions`);
4. LDS of user ``j`` = Spearman correlation over the ``M`` subsets between ``f_j(S_m)`` and
   ``L_j(S_m)``; the reported LDS is its mean over validation users, with a percentile
   bootstrap confidence interval that resamples validation users (:func:`jaxrec.lds.stats.score`).

Files, one job each: :mod:`jaxrec.lds.stats` (the statistics, NumPy only),
:mod:`jaxrec.lds.estimators` (each attribution name -> a :mod:`jaxrec.influence.attribution`
estimator's options; the ``dealrec`` row is the influence stage's
:func:`jaxrec.influence.dealrec.dealrec_scores`), :mod:`jaxrec.lds.study` (the study and the
``dealrec lds`` command), :mod:`jaxrec.lds.report` (its table and plot). Retraining lives in
:mod:`jaxrec.retrain`. Attributions are ``a[i, j] = g_i . M g_j`` with ``g_j`` the gradient of
validation user ``j``'s loss and ``M`` the estimator's preconditioner; the DEALRec score
(paper Eq. 11, ``g_i . H^-1 g_mean / n^2``) targets the training risk and is the same for
every ``j``.
"""

from jaxrec.lds.estimators import ATTRIBUTIONS, estimator_options, influence_config
from jaxrec.lds.report import bar_plot, markdown_table
from jaxrec.lds.stats import (
    bootstrap_ci,
    draw_subsets,
    lds_per_user,
    paired_difference,
    predictions,
    score,
    seed_agreement,
    spearman_columns,
)
from jaxrec.lds.study import main, retrained_losses, run, surrogate_config

__all__ = [
    "ATTRIBUTIONS",
    "bar_plot",
    "bootstrap_ci",
    "draw_subsets",
    "estimator_options",
    "influence_config",
    "lds_per_user",
    "main",
    "markdown_table",
    "paired_difference",
    "predictions",
    "retrained_losses",
    "run",
    "score",
    "seed_agreement",
    "spearman_columns",
    "surrogate_config",
]
