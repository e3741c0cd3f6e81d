"""Linear datamodeling score (LDS) of influence approximations (``dealrec lds``).

The protocol of Ilyas et al. 2022 ("Datamodels: predicting predictions from training data") as
used to score attribution methods by Park et al. 2023 (TRAK, "linear datamodeling score"):

1. draw ``M`` random subsets ``S_m`` holding a fraction ``alpha`` of the training samples
   (:func:`draw_subsets`);
2. retrain from the same initialisation on each subset, with several training seeds per subset
   whose losses are averaged (removes training noise), and measure each validation user's loss
   ``L_j(S_m)`` (:func:`retrained_losses`: cached one file per retrain, so a killed run
   continues, and computed once for every attribution);
3. from an attribution matrix ``a[i, j]`` (training sample ``i``, validation user ``j``; large
   positive = up-weighting ``i`` lowers ``L_j``) predict ``f_j(S) = -sum_{i in S} a[i, j]``
   (:func:`predictions`);
4. LDS of user ``j`` = Spearman correlation over the ``M`` subsets between ``f_j(S_m)`` and
   ``L_j(S_m)``; the reported LDS is its mean over validation users, with a percentile
   bootstrap confidence interval that resamples validation users (:func:`score`).

Attributions (:func:`solver_attribution`, :func:`exact_attribution`, :func:`arnoldi_attribution`,
:func:`grad_dot_attribution`, :func:`dealrec_attribution`) take the pure ``loss`` /
``per_sample_loss`` pair, parameters and data, and reuse the influence engine
(:mod:`jaxrec.influence`): ``a[i, j] = g_i . H^-1 g_j`` with ``g_j`` the gradient of validation
user ``j``'s loss. Each needs one inverse-HVP per validation user, so the number of validation
users is capped (``val_users``, a seeded choice). The DEALRec score (paper Eq. 11,
``g_i . H^-1 g_mean / n^2``) targets the training risk and is the same for every ``j``.
The surrogate side (:func:`surrogate_task`, :func:`retrain`, :func:`run`) trains the model named
by ``SurrogateConfig.model`` (SASRec where the config has no such field) with the recipe of
``dealrec train-surrogate`` for a fixed number of epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from jaxrec.config import (
    ArnoldiOptions,
    CGOptions,
    ExactOptions,
    InfluenceConfig,
    LdsConfig,
    LissaOptions,
    SurrogateConfig,
)
from jaxrec.data.scorefiles import atomic_write_bytes, write_json
from jaxrec.errors import UserError

ATTRIBUTIONS = ("exact", "cg", "lissa", "lissa-small", "arnoldi", "grad-dot", "dealrec")


# ----------------------------------------------------------------------------- scoring (NumPy)
def draw_subsets(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[m, n]`` bool masks, each selecting ``round(alpha n)`` samples uniformly without
    replacement. Drawn one after another from one generator, so the first ``m'`` masks of a
    larger ``m`` are the same (a run can be extended)."""
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got alpha={alpha}")
    if m < 2:
        raise UserError(f"LDS needs at least 2 subsets, got subsets={m}")
    k = max(1, int(round(alpha * n)))
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), bool)
    for r in range(m):
        masks[r, rng.choice(n, k, replace=False)] = True
    return masks


def predictions(attributions: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``f[m, j] = -sum_{i in S_m} a[i, j]``: the linear datamodel's predicted loss of
    validation user ``j`` after training on subset ``m`` (up to a constant)."""
    return -(masks.astype(np.float64) @ np.asarray(attributions, np.float64))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along axis 0, ties averaged (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, axis=0, kind="stable")
    ranks = np.empty_like(x)
    for col in range(x.shape[1]):
        xs = x[order[:, col], col]
        r = np.arange(1, len(xs) + 1, dtype=np.float64)
        start = 0
        for end in range(1, len(xs) + 1):  # average over runs of equal values
            if end == len(xs) or xs[end] != xs[start]:
                r[start:end] = r[start:end].mean()
                start = end
        ranks[order[:, col], col] = r
    return ranks


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``x`` with the same column of ``y`` (``[m, v]``
    each): the Pearson correlation of their ranks. NaN where a column is constant."""
    x, y = np.atleast_2d(np.asarray(x).T).T, np.atleast_2d(np.asarray(y).T).T
    if x.shape != y.shape:
        raise UserError(f"spearman_columns: shapes differ, {x.shape} vs {y.shape}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(0), ry - ry.mean(0)
    den = np.sqrt((rx**2).sum(0) * (ry**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(0) / np.where(den > 0, den, 1), np.nan)


def bootstrap_ci(
    values: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per validation user):
    ``resamples`` draws of the users with replacement; the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled means."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def lds_per_user(attributions: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Spearman over subsets, per validation user, between ``-sum_{i in S} a[i, j]`` and the
    measured loss ``losses[m, j]`` (seed-averaged). Returns ``[v]`` (NaN for a user whose
    measured losses or predictions are all equal)."""
    losses = np.asarray(losses, np.float64)
    if losses.shape != (masks.shape[0], np.shape(attributions)[1]):
        raise UserError(
            f"losses must be [subsets, validation users] = "
            f"{(masks.shape[0], np.shape(attributions)[1])}, got {losses.shape}"
        )
    return spearman_columns(predictions(attributions, masks), losses)


def score(
    attributions: dict,
    masks: np.ndarray,
    losses: np.ndarray,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """LDS of each attribution: ``{name: {"lds", "ci_low", "ci_high", "users", "per_user"}}``.

    ``attributions[name]`` is ``[n, v]``; ``losses`` is ``[M, v]`` (already averaged over seeds)
    or ``[M, seeds, v]`` (averaged here). ``lds`` is the mean over validation users of the
    per-user Spearman (NaN users dropped; ``users`` counts the rest); the interval is a
    percentile bootstrap over validation users (:func:`bootstrap_ci`)."""
    losses = np.asarray(losses, np.float64)
    if losses.ndim == 3:
        losses = losses.mean(1)
    out = {}
    for name, attr in attributions.items():
        per_user = lds_per_user(attr, masks, losses)
        ok = per_user[np.isfinite(per_user)]
        lo, hi = bootstrap_ci(ok, resamples=resamples, level=level, seed=seed)
        out[name] = {
            "lds": float(ok.mean()) if ok.size else float("nan"),
            "ci_low": lo,
            "ci_high": hi,
            "users": int(ok.size),
            "per_user": per_user.tolist(),
        }
    return out


def paired_difference(
    per_user_a, per_user_b, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict:
    """Mean over validation users of ``lds_a - lds_b`` (users where both are finite) with a
    percentile bootstrap interval over those users: a paired comparison of two attributions,
    far tighter than comparing their two intervals (both see the same users and subsets)."""
    a, b = np.asarray(per_user_a, np.float64), np.asarray(per_user_b, np.float64)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    lo, hi = bootstrap_ci(d, resamples=resamples, level=level, seed=seed)
    return {"mean": float(d.mean()) if d.size else float("nan"), "ci_low": lo, "ci_high": hi}


def seed_agreement(losses: np.ndarray) -> float | None:
    """Mean over users of the Spearman, over subsets, between the losses of two independent
    training seeds (``losses [M, seeds, v]``, seeds 0 and 1): how much of the subset-to-subset
    signal survives training noise. ``None`` with one seed."""
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 3 or losses.shape[1] < 2:
        return None
    r = spearman_columns(losses[:, 0], losses[:, 1])
    r = r[np.isfinite(r)]
    return float(r.mean()) if r.size else None


# ----------------------------------------------------------------------------- retraining
def retrained_losses(
    retrain_losses,
    masks: np.ndarray,
    seeds,
    cache: str | Path | None = None,
    *,
    progress: bool | None = None,
) -> np.ndarray:
    """``[M, len(seeds), v]``: ``retrain_losses(mask, seed) -> [v]`` (train on the subset
    ``mask`` with training seed ``seed``, return each validation user's loss) for every subset
    and seed.

    With ``cache`` (a folder), each result is written to ``cache/m{m:04d}_s{seed}.npy``
    atomically as soon as it is computed and read back instead of recomputed, so a killed run
    continues where it stopped. The cache is keyed by position only: the caller keeps one
    folder per setting (:func:`run` checks a fingerprint)."""
    seeds = list(seeds)
    cache = Path(cache) if cache else None
    out = [[None] * len(seeds) for _ in range(len(masks))]
    todo = []
    for m in range(len(masks)):
        for k, s in enumerate(seeds):
            f = cache / f"m{m:04d}_s{s}.npy" if cache else None
            if f is not None and f.is_file():
                out[m][k] = np.load(f, allow_pickle=False)
            else:
                todo.append((m, k, s, f))
    bar = tqdm(
        total=len(masks) * len(seeds),
        initial=len(masks) * len(seeds) - len(todo),
        desc="retrain",
        unit="model",
        disable=None if progress is None else not progress,
    )
    with bar:
        for m, k, s, f in todo:
            value = np.asarray(retrain_losses(masks[m], s), np.float64)
            if not np.all(np.isfinite(value)):
                raise UserError(f"retrain on subset {m} (seed {s}) gave a non-finite loss")
            if f is not None:
                atomic_write_bytes(f, lambda fh, v=value: np.save(fh, v, allow_pickle=False))
            out[m][k] = value
            bar.update(1)
    return np.stack([np.stack(row) for row in out])


# ----------------------------------------------------------------------------- attributions
def _effective(damping: float, convention: str, scale: float) -> tuple[float, float]:
    """``(lam, factor)`` with ``u = factor (H + lam I)^-1 v``: the convention of
    :func:`jaxrec.influence.inverse_hvp` (``dealrec``: ``scale (H + scale damping I)^-1``)."""
    if convention not in ("dealrec", "standard"):
        raise UserError(f"unknown convention {convention!r}; expected dealrec or standard")
    return (scale * damping, scale) if convention == "dealrec" else (damping, 1.0)


def validation_gradients(per_sample_loss, params, val_data) -> list:
    """``g_j``: the gradient of each validation row's loss (one pytree per row of
    ``val_data``), by :func:`jaxrec.influence.mean_gradient` on that row alone."""
    from jaxrec.influence import mean_gradient
    from jaxrec.influence.batching import data_size

    rows = data_size(val_data)
    return [
        mean_gradient(
            per_sample_loss, params, jax.tree.map(lambda x, j=j: np.asarray(x)[j : j + 1], val_data)
        )
        for j in range(rows)
    ]


def _columns(per_sample_loss, params, data, vectors, progress) -> np.ndarray:
    """``[n, v]``: ``g_i . u_j`` for every training sample and vector, one JVP pass per
    vector (:func:`jaxrec.influence.sample_scores`)."""
    from jaxrec.influence import sample_scores

    cols = [
        sample_scores(per_sample_loss, params, data, u)
        for u in tqdm(vectors, desc="scores", leave=False, disable=_off(progress))
    ]
    return np.stack(cols, 1).astype(np.float64)


def _off(progress):
    return None if progress is None else not progress


def solver_attribution(
    loss,
    per_sample_loss,
    params,
    data,
    val_grads,
    *,
    solver="cg",
    damping: float = 0.01,
    convention: str = "dealrec",
    scale: float = 25.0,
    progress: bool | None = None,
) -> np.ndarray:
    """``a[i, j] = g_i . (H + lam I)^-1 g_j`` (influence of up-weighting training sample ``i``
    on validation loss ``j``, Koh & Liang 2017), one :func:`jaxrec.influence.inverse_hvp`
    per validation gradient with ``solver`` (a name or options dataclass, e.g.
    ``LissaOptions(steps=5000)``), ``damping``, ``convention`` and ``scale`` as there.
    ``H`` is the Hessian of ``loss`` (the mean) over ``data``. Returns ``[n, len(val_grads)]``."""
    from jaxrec.influence import inverse_hvp

    us = [
        inverse_hvp(
            loss,
            params,
            data,
            g,
            solver=solver,
            damping=damping,
            convention=convention,
            scale=scale,
            progress=False,
        )
        for g in tqdm(val_grads, desc="inverse-HVP", leave=False, disable=_off(progress))
    ]
    return _columns(per_sample_loss, params, data, us, progress)


def exact_attribution(
    loss,
    per_sample_loss,
    params,
    data,
    val_grads,
    *,
    damping: float = 0.01,
    convention: str = "dealrec",
    scale: float = 25.0,
    options: ExactOptions | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """:func:`solver_attribution` with the exact inverse: the dense Hessian of a small
    parameter block (``params`` restricted by :class:`jaxrec.influence.ParamSubset`; at most
    20,000 values) is built once (:func:`jaxrec.influence.exact.hessian_matrix`) and solved in
    float64 for every ``g_j`` at once. Returns ``[n, v]``."""
    from jaxrec.influence.exact import hessian_matrix
    from jaxrec.influence.operator import FullHessian

    options = options or ExactOptions()
    lam, factor = _effective(damping, convention, scale)
    h = hessian_matrix(FullHessian(loss, params, data, options.batch_size), options.chunk)
    unravel = ravel_pytree(params)[1]
    rhs = np.stack([np.asarray(ravel_pytree(g)[0], np.float64) for g in val_grads], 1)
    try:
        x = factor * np.linalg.solve(h + lam * np.eye(h.shape[0]), rhs)
    except np.linalg.LinAlgError:
        raise UserError(f"H + {lam} I is singular; increase damping=") from None
    dtype = ravel_pytree(params)[0].dtype
    us = [unravel(jnp.asarray(x[:, j], dtype)) for j in range(x.shape[1])]
    return _columns(per_sample_loss, params, data, us, progress)


def arnoldi_attribution(
    loss,
    per_sample_loss,
    params,
    data,
    val_grads,
    *,
    damping: float = 0.01,
    convention: str = "dealrec",
    scale: float = 25.0,
    options: ArnoldiOptions | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """:func:`solver_attribution` with the Arnoldi low-rank inverse (Schioppa et al. 2022):
    the top eigenpairs (:func:`jaxrec.influence.arnoldi.eigenpairs`) are computed once and
    applied to every ``g_j``, ``u = sum_k <e_k, g> / (lambda_k + lam) e_k``. Returns ``[n, v]``."""
    from jaxrec.influence.arnoldi import eigenpairs
    from jaxrec.influence.operator import FullHessian

    options = options or ArnoldiOptions()
    lam, factor = _effective(damping, convention, scale)
    op = FullHessian(loss, params, data, options.batch_size)
    eig, vecs, unravel = eigenpairs(
        op,
        rank=options.rank,
        iterations=options.iterations,
        key=jax.random.PRNGKey(options.seed),
        progress=progress,
    )
    if np.any(eig + lam <= 0):
        raise UserError(f"Arnoldi found eigenvalue {eig.min():.3g} <= -damping; increase damping=")
    inv = jnp.asarray(factor / (eig + lam), vecs.dtype)
    us = [unravel(((vecs @ ravel_pytree(g)[0]) * inv) @ vecs) for g in val_grads]
    return _columns(per_sample_loss, params, data, us, progress)


def grad_dot_attribution(
    per_sample_loss, params, data, val_grads, *, progress: bool | None = None
) -> np.ndarray:
    """``a[i, j] = g_i . g_j`` (no Hessian; TracIn at one checkpoint). Returns ``[n, v]``."""
    return _columns(per_sample_loss, params, data, val_grads, progress)


def influence_config(cfg: LdsConfig) -> InfluenceConfig:
    """The :class:`InfluenceConfig` of the ``dealrec`` row: the influence stage's defaults with
    ``cfg``'s parameter block, solver settings (LiSSA), negative draws and sample loss."""
    return InfluenceConfig(
        solver="lissa",
        params=cfg.params,
        convention=cfg.convention,
        damping=cfg.damping,
        scale=cfg.scale,
        steps=cfg.lissa_steps,
        lissa_batch_size=cfg.lissa_batch_size,
        lissa_tol=cfg.lissa_tol,
        seed=cfg.seed,
        negative_draws=cfg.negative_draws,
        sample_loss=cfg.sample_loss,
    )


def dealrec_attribution(
    loss,
    per_sample_loss,
    sample_loss,
    params,
    data: dict,
    n_val: int,
    cfg: InfluenceConfig,
    *,
    draw=None,
    progress: bool | None = None,
) -> np.ndarray:
    """The DEALRec score (paper Eq. 11) ``g_i . H^-1 g_mean / n^2`` exactly as the pipeline's
    influence stage computes it (:func:`jaxrec.influence.dealrec.dealrec_scores`, same
    arguments: full ``params``, user-order ``data``, ``draw`` for the negative draws),
    repeated for each of the ``n_val`` validation users: it targets the training risk, not a
    validation loss. Returns ``[n, n_val]`` in user order."""
    from jaxrec.influence.dealrec import dealrec_scores

    s, _ = dealrec_scores(
        loss, per_sample_loss, sample_loss, params, data, cfg, draw=draw, progress=progress
    )
    return np.repeat(np.asarray(s, np.float64)[:, None], n_val, 1)


def attribution(
    name: str, loss, per_sample_loss, params, data, val_grads, cfg: LdsConfig, progress=None
):
    """The attribution ``name`` (one of :data:`ATTRIBUTIONS` but ``dealrec``, see
    :func:`dealrec_attribution`) with the solver settings of ``cfg``: ``[n, len(val_grads)]``
    on the parameter block of ``params`` and ``data``'s rows."""
    common = dict(convention=cfg.convention, scale=cfg.scale, progress=progress)
    lissa = LissaOptions(
        steps=cfg.lissa_steps, batch_size=cfg.lissa_batch_size, seed=cfg.seed, tol=cfg.lissa_tol
    )
    if name == "exact":
        return exact_attribution(
            loss, per_sample_loss, params, data, val_grads, damping=cfg.damping, **common
        )
    if name == "cg":
        opts = CGOptions(tol=cfg.cg_tol, maxiter=cfg.cg_maxiter)
        return solver_attribution(
            loss,
            per_sample_loss,
            params,
            data,
            val_grads,
            solver=opts,
            damping=cfg.damping,
            **common,
        )
    if name in ("lissa", "lissa-small"):
        damping = cfg.damping if name == "lissa" else cfg.small_damping
        return solver_attribution(
            loss,
            per_sample_loss,
            params,
            data,
            val_grads,
            solver=lissa,
            damping=damping,
            **common,
        )
    if name == "arnoldi":
        opts = ArnoldiOptions(rank=cfg.arnoldi_rank, iterations=cfg.arnoldi_iterations)
        return arnoldi_attribution(
            loss,
            per_sample_loss,
            params,
            data,
            val_grads,
            damping=cfg.damping,
            options=opts,
            **common,
        )
    if name == "grad-dot":
        return grad_dot_attribution(per_sample_loss, params, data, val_grads, progress=progress)
    if name == "dealrec":  # run() scores it on the full model (dealrec_attribution)
        raise UserError("the dealrec attribution needs the full model: use dealrec_attribution")
    raise UserError(f"unknown attribution {name!r}; expected one of {', '.join(ATTRIBUTIONS)}")


# ----------------------------------------------------------------------------- the surrogate
@dataclass
class SurrogateTask:
    """What retraining a surrogate on subsets needs: model, its pure loss pair, the training
    arrays (one row per user), the fixed-negative data the influence engine differentiates,
    and the validation batch (one row per validation user)."""

    cfg: SurrogateConfig
    model: object
    init_params: callable
    loss: callable
    per_sample_loss: callable
    sample_loss: callable  # the per-user loss (jaxrec.models.sample_loss): DEALRec's g_i
    arrays: dict
    train_data: dict
    valid: dict
    step: callable
    dataset: object  # the Dataset (sequence negatives exclude each user's train items)


def _model_module(cfg: SurrogateConfig):
    """The model's registry entry (:func:`jaxrec.models.spec`): ``init_params`` and, where the
    model defines one, ``validation_arrays(ds, max_len)`` for its own batch format."""
    from jaxrec.models import spec

    name = getattr(cfg, "model", "sasrec")
    return importlib.import_module(f"jaxrec.models.{name}"), spec(name)


def validation_arrays(ds, max_len: int) -> dict:
    """Next-item samples whose targets are each user's valid items (after the train history;
    train targets are not scored), for the users with a valid item; ``index`` = user row.
    Negatives come from a fixed seed, so the validation loss is one fixed function."""
    from jaxrec.train import with_negatives

    rows = [u for u in range(ds.n_users) if len(ds.valid[u]) and len(ds.train[u])]
    inputs = np.zeros((len(rows), max_len), np.int32)
    targets = np.zeros_like(inputs)
    for r, u in enumerate(rows):
        seq = np.concatenate([ds.train[u], ds.valid[u]])[-(max_len + 1) :]
        n_valid = min(len(ds.valid[u]), len(seq) - 1)
        inputs[r, max_len - len(seq) + 1 :] = seq[:-1]
        targets[r, max_len - n_valid :] = seq[-n_valid:]
    arrays = {"inputs": inputs, "targets": targets, "index": np.asarray(rows, np.int32)}
    return with_negatives(arrays, 12345, 0, ds.n_items)


def surrogate_task(cfg: SurrogateConfig, ds) -> SurrogateTask:
    """The :class:`SurrogateTask` of ``cfg``'s model on dataset ``ds`` (model from
    :func:`jaxrec.train.build_model`, training step from :func:`jaxrec.train.make_train_step`,
    loss pair and initialisation from the model's module). A model module may define
    ``validation_arrays(ds, max_len)`` for its own batch format; else :func:`validation_arrays`."""
    import optax

    from jaxrec.data import training_arrays
    from jaxrec.models import sample_loss
    from jaxrec.models.sasrec import positions_per_sample
    from jaxrec.train import build_model, loss_fns, make_train_step, training_data

    module, model_spec = _model_module(cfg)
    model = build_model(cfg, ds.n_items, ds)
    arrays = training_arrays(ds, cfg.max_len)
    loss, per_sample_loss = loss_fns(cfg, model, arrays)
    valid = getattr(module, "validation_arrays", validation_arrays)(ds, cfg.max_len)
    if len(valid["inputs"]) == 0:
        raise UserError(f"{ds.path}: no user has a valid item; LDS needs validation users")
    return SurrogateTask(
        cfg=cfg,
        model=model,
        init_params=model_spec.init_params,
        loss=loss,
        per_sample_loss=per_sample_loss,
        sample_loss=sample_loss(model),
        arrays=arrays,
        train_data=training_data(cfg, arrays, ds, 0),
        valid=valid,
        step=make_train_step(
            model,
            optax.adam(cfg.lr),
            cfg.loss_weighting,
            float(positions_per_sample(arrays["targets"])),
        ),
        dataset=ds,
    )


def retrain(task: SurrogateTask, mask: np.ndarray, seed: int):
    """Train from the initialisation of ``task.cfg.seed`` on the users in ``mask`` for
    ``task.cfg.epochs`` epochs (no early stopping, so every retrain follows one recipe: the
    epoch loop of ``dealrec train-surrogate``). ``seed`` drives the training noise only:
    batch order, dropout and sampled negatives. Users outside ``mask`` have their targets
    cleared, so they are never in a batch. Returns the parameters."""
    import optax

    from jaxrec.train import train_epoch, training_data

    cfg = task.cfg
    params = task.init_params(task.model, jax.random.PRNGKey(cfg.seed))
    opt_state = optax.adam(cfg.lr).init(params)
    arrays = dict(task.arrays, targets=np.where(mask[:, None], task.arrays["targets"], 0))
    rng = np.random.default_rng([cfg.seed, seed])
    key = jax.random.PRNGKey(seed + 1)
    for epoch in range(1, cfg.epochs + 1):
        data = training_data(cfg, arrays, task.dataset, epoch, seed)
        params, opt_state, key, value = train_epoch(
            task.step, params, opt_state, key, data, cfg, rng
        )
        if not np.isfinite(value):
            raise UserError(f"retraining diverged at epoch {epoch} (loss {value}); lower lr=")
    return params


def valid_losses(task: SurrogateTask, params) -> np.ndarray:
    """Each validation user's loss ``[n_valid]`` under ``params`` (the model's
    ``per_sample_loss`` on :attr:`SurrogateTask.valid`)."""
    batch = {k: jnp.asarray(v) for k, v in task.valid.items() if k != "index"}
    return np.asarray(jax.jit(task.per_sample_loss)(params, batch), np.float64)


# ----------------------------------------------------------------------------- the command
def surrogate_config(cfg: LdsConfig, data: str) -> SurrogateConfig:
    """The surrogate recipe of an LDS run: ``SurrogateConfig`` defaults with ``cfg``'s model,
    epochs, dropout, lr, batch size and seed. A model other than ``sasrec`` needs a
    ``SurrogateConfig.model`` field that accepts it."""
    import typing

    values = dict(
        data=data,
        epochs=cfg.epochs,
        dropout=cfg.dropout,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    names = {f.name for f in dataclasses.fields(SurrogateConfig)}
    if "model" in names:
        choices = typing.get_args(typing.get_type_hints(SurrogateConfig)["model"])
        if choices and cfg.model not in choices:
            raise UserError(f"model={cfg.model!r}: expected one of {', '.join(choices)}")
        values["model"] = cfg.model
    elif cfg.model != "sasrec":
        raise UserError(f"model={cfg.model!r}: this build has the sasrec surrogate only")
    return dataclasses.replace(SurrogateConfig(), **values)


# Fields that change retrained losses or attributions; the others (subsets, seeds,
# attributions, bootstrap) may change between runs on one folder: masks and seeds are drawn as
# prefixes, and attributions are cached one file each.
_SCORING_ONLY = {"out", "subsets", "seeds", "attributions", "bootstrap", "level", "compile_cache"}
# Fields only the dealrec row reads: keyed in its file name (_dealrec_tag), not the folder's.
_DEALREC_ONLY = {"negative_draws", "sample_loss"}
_RETRAIN_KEYS = {"data", "users", "alpha", "epochs", "dropout", "lr", "batch_size", "seed", "model"}


def _fingerprint(cfg: LdsConfig, keys) -> str:
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k in keys}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _dealrec_tag(cfg: LdsConfig) -> str:
    """The suffix of the dealrec row's cache file: its own options (and the score's version:
    since issue 23 it is :func:`jaxrec.influence.dealrec.dealrec_scores`, so a file of the
    earlier one-draw, training-loss score is never reused)."""
    return "v2_" + _fingerprint(cfg, _DEALREC_ONLY)[:8]


def _check_folder(out: Path, cfg: LdsConfig) -> None:
    """Refuse to mix runs: ``out/settings.json`` must match ``cfg`` (except scoring-only
    fields). Writes it on a fresh folder."""
    keep = {
        k: v for k, v in dataclasses.asdict(cfg).items() if k not in _SCORING_ONLY | _DEALREC_ONLY
    }
    f = out / "settings.json"
    if f.is_file():
        old = json.loads(f.read_text())
        diff = sorted(k for k in set(old) | set(keep) if old.get(k) != keep.get(k))
        if diff:
            raise UserError(
                f"{out} holds an LDS run with other settings ({diff[0]}={old.get(diff[0])!r}, "
                f"now {keep.get(diff[0])!r}); use another out="
            )
    else:
        write_json(f, keep)


def check_options(cfg: LdsConfig) -> None:
    """Every check of ``cfg`` that needs no data: attribution names, counts, fractions and the
    parameter regex. Raises :class:`UserError` naming the options and their values."""
    import re

    from jaxrec.influence.params import resolve_pattern

    unknown = [a for a in cfg.attributions if a not in ATTRIBUTIONS]
    if unknown:
        raise UserError(
            f"unknown attribution {unknown[0]!r} in attributions=; expected "
            + ", ".join(ATTRIBUTIONS)
        )
    if not cfg.attributions or len(set(cfg.attributions)) != len(cfg.attributions):
        raise UserError(f"attributions= must name distinct attributions, got {cfg.attributions}")
    small = {
        k: getattr(cfg, k) for k in ("seeds", "val_users", "epochs", "bootstrap", "batch_size")
    }
    bad = {k: v for k, v in small.items() if v < 1}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UserError(f"{shown}: must be >= 1")
    if cfg.users < 0:
        raise UserError(f"users={cfg.users}: must be >= 0 (0 = every user)")
    if not 0 < cfg.alpha < 1:
        raise UserError(f"alpha={cfg.alpha}: the subset fraction must be in (0, 1)")
    if cfg.subsets < 2:
        raise UserError(f"subsets={cfg.subsets}: LDS needs at least 2 subsets")
    if not 0 < cfg.level < 1:
        raise UserError(f"level={cfg.level}: the confidence level must be in (0, 1)")
    for name in ("damping", "small_damping", "scale", "lr"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"{name}={getattr(cfg, name)}: must be > 0")
    try:
        re.compile(resolve_pattern(cfg.params))
    except re.error as e:
        raise UserError(f"params={cfg.params!r} is not a valid regex ({e})") from None


def check_parameters(cfg: LdsConfig, ds) -> int:
    """The size of the block ``cfg.params`` selects in ``cfg.model`` on dataset ``ds``, from the
    parameter shapes alone (nothing is trained). Raises :class:`UserError` when it selects
    nothing, or more than the exact solve takes while ``exact`` is among the attributions."""
    from jaxrec.influence.exact import MAX_DIM
    from jaxrec.influence.params import ParamSubset
    from jaxrec.train import build_model

    scfg = surrogate_config(cfg, str(ds.path))
    _module, model_spec = _model_module(scfg)
    model = build_model(scfg, ds.n_items, ds)
    shapes = jax.eval_shape(lambda: model_spec.init_params(model, jax.random.PRNGKey(0)))
    try:
        size = ParamSubset(shapes, cfg.params).size
    except UserError as e:
        raise UserError(f"params={cfg.params!r}: {e}") from None
    if "exact" in cfg.attributions and size > MAX_DIM:
        raise UserError(
            f"params={cfg.params!r} selects {size:,} values; the exact attribution takes at "
            f"most {MAX_DIM:,}: choose a smaller block with params= or drop exact from "
            "attributions="
        )
    return size


def _cached(path: Path, compute):
    if path.is_file():
        return np.load(path, allow_pickle=False)
    value = np.asarray(compute())
    atomic_write_bytes(path, lambda fh: np.save(fh, value, allow_pickle=False))
    return value


def run(cfg: LdsConfig, *, progress: bool | None = None) -> dict:
    """An LDS study on one dataset slice: train the surrogate on all users, compute every
    attribution of ``cfg.attributions`` for up to ``cfg.val_users`` validation users, retrain
    on ``cfg.subsets`` random ``cfg.alpha`` subsets x ``cfg.seeds`` training seeds, and score.
    Everything lands in ``cfg.out`` (``results.json``, ``results.md``, ``lds.png``), with the
    retrained losses and attributions cached there as ``.npy`` so a killed run continues.
    Returns the results dict."""
    from jaxrec.data import load_dataset
    from jaxrec.data.buckets import width_strata
    from jaxrec.data.subset import write_user_subset
    from jaxrec.influence import ParamSubset
    from jaxrec.train import negative_draw

    check_options(cfg)
    t0 = time.perf_counter()
    full = load_dataset(cfg.data)
    check_parameters(cfg, full)  # all checked before anything is written
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, cfg)
    if cfg.users and cfg.users < full.n_users:
        sliced = out / "data"
        if not (sliced / "sequential_train.txt").is_file():
            write_user_subset(full, sliced, n_users=cfg.users, seed=cfg.seed)
        ds = load_dataset(sliced)
    else:
        ds = full
    task = surrogate_task(surrogate_config(cfg, str(ds.path)), ds)
    n = ds.n_users
    masks = draw_subsets(n, cfg.subsets, cfg.alpha, cfg.seed + 100)
    n_valid = len(task.valid["inputs"])
    chosen = np.sort(
        np.random.default_rng(cfg.seed + 200).choice(
            n_valid, min(cfg.val_users, n_valid), replace=False
        )
    )

    timing, engine = {}, {}
    fp = _fingerprint(cfg, set(dataclasses.asdict(cfg)) - _SCORING_ONLY - _DEALREC_ONLY)
    meta = out / "attributions" / f"meta_{fp}.json"

    def setup():
        """The full model and its engine inputs, built only when an attribution is missing."""
        if not engine:
            t = time.perf_counter()
            full_params = retrain(task, np.ones(n, bool), 0)
            timing["train_full"] = time.perf_counter() - t
            sub = ParamSubset(full_params, cfg.params)
            val_rows = jax.tree.map(lambda x: np.asarray(x)[chosen], task.valid)
            val_rows = {k: v for k, v in val_rows.items() if k != "index"}
            psl = sub.restrict(task.per_sample_loss)
            engine.update(
                params=full_params,
                sub=sub,
                loss=sub.restrict(task.loss),
                psl=psl,
                strata=width_strata(task.train_data, task.cfg.max_len),
                val_grads=validation_gradients(psl, sub.params, val_rows),
            )
            write_json(meta, {"n_params": sub.size, "paths": sub.paths})
        return engine

    attributions = {}
    for name in cfg.attributions:
        t = time.perf_counter()

        def compute(name=name):
            e = setup()
            if name == "dealrec":  # the influence stage's score: library call, user order
                return dealrec_attribution(
                    task.loss,
                    task.per_sample_loss,
                    task.sample_loss,
                    e["params"],
                    task.train_data,
                    len(e["val_grads"]),
                    influence_config(cfg),
                    draw=negative_draw(task.cfg, task.train_data, task.dataset),
                    progress=progress,
                )
            order, parts = e["strata"]
            a = attribution(
                name, e["loss"], e["psl"], e["sub"].params, parts, e["val_grads"], cfg, progress
            )
            back = np.empty_like(a)
            back[order] = a  # strata order -> user order
            return back

        tag = f"{fp}_{_dealrec_tag(cfg)}" if name == "dealrec" else fp
        attributions[name] = _cached(out / "attributions" / f"{name}_{tag}.npy", compute)
        timing[f"attribution_{name}"] = time.perf_counter() - t
    n_params = json.loads(meta.read_text())["n_params"] if meta.is_file() else setup()["sub"].size
    retrain_seconds = []

    def retrain_losses(mask, seed):
        t = time.perf_counter()
        value = valid_losses(task, retrain(task, mask, seed))[chosen]
        retrain_seconds.append(time.perf_counter() - t)
        return value

    t = time.perf_counter()
    cache = out / "retrained" / _fingerprint(cfg, _RETRAIN_KEYS | {"val_users"})
    losses = retrained_losses(retrain_losses, masks, range(cfg.seeds), cache, progress=progress)
    timing["retrain"] = time.perf_counter() - t
    if retrain_seconds:
        timing["seconds_per_retrain"] = float(np.mean(retrain_seconds))
    scores = score(
        attributions, masks, losses, resamples=cfg.bootstrap, level=cfg.level, seed=cfg.seed
    )
    ref = attributions.get("exact")
    if ref is not None:
        for k in scores:
            scores[k]["minus_exact"] = paired_difference(
                scores[k]["per_user"],
                scores["exact"]["per_user"],
                resamples=cfg.bootstrap,
                level=cfg.level,
                seed=cfg.seed,
            )
    results = {
        "protocol": "LDS (Ilyas et al. 2022; Park et al. 2023): Spearman over subsets per "
        "validation user, mean over users, percentile bootstrap CI over validation users",
        "data": cfg.data,
        "users": n,
        "valid_users": int(n_valid),
        "scored_valid_users": int(len(chosen)),
        "subsets": cfg.subsets,
        "alpha": cfg.alpha,
        "seeds": cfg.seeds,
        "epochs": cfg.epochs,
        "model": cfg.model,
        "params": cfg.params,
        "n_params": n_params,
        "seed_agreement": seed_agreement(losses),
        "lds": {k: _summary(v, attributions[k], ref) for k, v in scores.items()},
        "per_user": {k: v["per_user"] for k, v in scores.items()},
        "config": dataclasses.asdict(cfg),
        "seconds": {
            k: round(v, 1) for k, v in {**timing, "total": time.perf_counter() - t0}.items()
        },
    }
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results))
    bar_plot(results, out / "lds.png")
    return results


def _summary(scored: dict, attr: np.ndarray, ref) -> dict:
    """One attribution's row of ``results["lds"]`` (with the comparison to ``exact``)."""
    out = {x: scored[x] for x in ("lds", "ci_low", "ci_high", "users")}
    if ref is not None:
        out["spearman_vs_exact"] = float(spearman_columns(attr.ravel(), ref.ravel())[0])
        out["minus_exact"] = scored["minus_exact"]
    return out


def markdown_table(results: dict) -> str:
    """The LDS table of :func:`run`'s results: one row per attribution, with the interval and,
    when ``exact`` ran, the paired difference to it and the Spearman of the attributions."""
    level = int(round(100 * results["config"]["level"]))
    vs = all("minus_exact" in v for v in results["lds"].values())
    head = f"| attribution | LDS | {level}% CI | users |"
    if vs:
        head += f" LDS - exact [{level}% CI, paired] | Spearman of a[i, j] with exact |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, v in results["lds"].items():
        row = (
            f"| {name} | {v['lds']:.3f} | [{v['ci_low']:.3f}, {v['ci_high']:.3f}] | {v['users']} |"
        )
        if vs:
            d = v["minus_exact"]
            row += (
                f" {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |"
                f" {v['spearman_vs_exact']:.3f} |"
            )
        lines.append(row)
    return "\n".join(lines) + "\n"


def bar_plot(results: dict, path: Path) -> Path:
    """A bar per attribution: LDS with its bootstrap interval as the error bar."""
    from jaxrec.figures import _plt

    plt = _plt()
    names = list(results["lds"])
    vals = np.array([results["lds"][k]["lds"] for k in names])
    lo = vals - np.array([results["lds"][k]["ci_low"] for k in names])
    hi = np.array([results["lds"][k]["ci_high"] for k in names]) - vals
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 3.4))
    ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=3, color="#4c72b0")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("LDS")
    ax.set_title(
        f"{results['model']}, {results['users']} users, M={results['subsets']}, "
        f"{results['seeds']} seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(cfg: LdsConfig) -> int:
    """``dealrec lds``: :func:`run`, then print the table."""
    from jaxrec.influence.cli import use_compile_cache

    use_compile_cache(cfg.compile_cache)
    results = run(cfg)  # the command line names the flags of its errors (jaxrec.cli)
    print(markdown_table(results), end="")
    print(f"{cfg.out}: results.json, results.md, lds.png ({results['seconds']['total']:.0f} s)")
    return 0
