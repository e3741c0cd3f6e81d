"""The LDS statistics (NumPy only): subsets, the linear datamodel's predictions, Spearman per
validation user, percentile bootstrap intervals, paired differences, seed agreement.

The protocol of Ilyas et al. 2022 ("Datamodels") as Park et al. 2023 (TRAK) score attribution
methods with it; see :mod:`jaxrec.lds`.
"""

from __future__ import annotations

import numpy as np

from jaxrec.errors import UserError


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
    attributions: dict[str, np.ndarray],
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
    per_user_a: np.ndarray | list,
    per_user_b: np.ndarray | list,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
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
