"""Statistics of an experiment's runs.

The unit of evidence about a *method* is the seed: within one seed every evaluated user shares
one selected subset and one fine-tuned model, so per-user tests measure those two trained
models, not the methods (issue 23: two random runs of different seeds "differ" at per-user
p = 0.003). So the headline is seed-level:

* per method and grid point, each metric's mean over seeds with a 95 % t-interval
  (:func:`t_interval`);
* per comparison with the baseline, the difference of the means over seeds with its 95 %
  interval and Welch's t-test (:func:`welch`; the two arms share no data, so pairing by seed
  buys nothing), the minimum detectable difference at the observed spread (:func:`mdd`) and,
  with ``experiment.bootstrap``, a cluster bootstrap over seeds and users
  (:func:`cluster_bootstrap`).

The per-user tests (:func:`user_tests`) stay, conditional on the trained models.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np

from jaxrec.errors import UserError
from jaxrec.experiment.grid import LOSS, METRICS, TABLE_METRICS
from jaxrec.experiment.rows import run_user_losses, run_user_metrics
from jaxrec.stages import PER_RUN

LEVEL = 0.95  # intervals
POWER = 0.80  # minimum detectable difference
ONE_SEED = "one seed: no test"
NO_SPREAD = "no spread over seeds: no test"


def _groups(rows: list[dict], keys: list[str]) -> dict[tuple, dict[str, list[dict]]]:
    """``{point: {method: [rows sorted by seed]}}``."""
    out: dict[tuple, dict[str, list[dict]]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        point = tuple(r[k] for k in keys)
        out.setdefault(point, {}).setdefault(r["method"], []).append(r)
    return out


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of ``values`` (one per seed) and its ``level`` t-interval,
    ``mean -+ t_{(1+level)/2, n-1} * s / sqrt(n)``; ``(mean, nan, nan)`` for one value (its
    spread is unknown, not zero).

    Args:
      values: one number per seed.
      level: the interval's coverage.
    Returns:
      ``(mean, lo, hi)``.
    """
    from scipy import stats  # here: scipy.stats would add seconds to every dealrec start

    x = np.asarray(values, float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return mean, float(mean - half), float(mean + half)


def mdd(se: float, df: float, alpha: float = 1 - LEVEL, power: float = POWER) -> float:
    """The minimum detectable difference of a two-sided test at level ``alpha`` with ``power``,
    at standard error ``se`` and ``df`` degrees of freedom:
    ``(t_{1-alpha/2, df} + t_{power, df}) * se`` (the usual normal-approximation formula with
    t quantiles; the noncentral t would give a slightly larger value at very few seeds).

    Args:
      se: the standard error of the difference (:func:`welch`).
      df: its degrees of freedom.
      alpha: the test's level.
      power: the wanted power.
    Returns:
      the smallest true difference the test finds with probability ``power``.
    """
    from scipy import stats  # here: scipy.stats would add seconds to every dealrec start

    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)


def welch(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict:
    """Welch's two-sample t-test of ``mean(a) - mean(b)`` (unequal variances; the arms' runs
    are independent, so they are not paired by seed), with the difference's ``level``
    interval and the minimum detectable difference at the observed spread.

    Args:
      a: the method's values, one per seed (>= 2).
      b: the baseline's values, one per seed (>= 2).
      level: the interval's coverage.
    Returns:
      ``{"mean_diff", "lo", "hi", "se", "df", "t", "p", "mdd"}``; with one value in an arm,
      or no spread in either, only ``mean_diff`` and ``note`` (:data:`ONE_SEED` /
      :data:`NO_SPREAD`).
    """
    from scipy import stats  # here: scipy.stats would add seconds to every dealrec start

    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"mean_diff": diff, "note": ONE_SEED}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return {"mean_diff": diff, "note": NO_SPREAD}
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    half = stats.t.ppf((1 + level) / 2, df) * se
    return {
        "mean_diff": diff,
        "lo": diff - half,
        "hi": diff + half,
        "se": se,
        "df": df,
        "t": t,
        "p": float(2 * stats.t.sf(abs(t), df)),
        "mdd": mdd(se, df, 1 - level),
    }


def cluster_bootstrap(
    a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval of ``mean(a) - mean(b)`` under a two-way cluster bootstrap: each
    draw resamples each arm's seeds (rows) with replacement, independently, and the users
    (columns) with replacement, the same users for both arms (every run evaluates the same
    users), so both sources of noise, the trained model and the test users, enter. With few
    seeds (< about 10 per arm) resampling them understates the seed-to-seed spread: the
    interval is then too narrow, and Welch's interval (:func:`welch`) is the one to read.

    Args:
      a: the method's per-user values, ``[seeds, users]``.
      b: the baseline's, ``[seeds, users]`` (same users, same order).
      draws: bootstrap draws.
      seed: the draws' random seed.
      level: the interval's coverage.
    Returns:
      ``(lo, hi)``.
    """
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, float), np.asarray(b, float)
    n_users = a.shape[1]
    # counts of each user / seed in each draw: the resampled grand mean is cs @ X @ cu / (S U)
    cu = rng.multinomial(n_users, np.full(n_users, 1 / n_users), size=draws).T  # [U, draws]
    means = []
    for x in (a, b):
        cs = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=draws)  # [draws, S]
        means.append(np.einsum("ds,sd->d", cs, x @ cu) / (len(x) * n_users))
    diff = means[0] - means[1]
    q = (1 - level) / 2
    return float(np.quantile(diff, q)), float(np.quantile(diff, 1 - q))


def _per_user(runs: list[dict], metric: str) -> np.ndarray:
    """``[runs, users]``: each run's per-user ``metric`` (the test loss for :data:`LOSS`),
    users sorted by row."""
    out = []
    for r in runs:
        users, values = run_user_losses(r) if metric == LOSS else run_user_metrics(r)
        values = values if metric == LOSS else values[metric]
        out.append(np.asarray(values, float)[np.argsort(users)])
    return np.stack(out)


def summary_row(runs: list[dict]) -> dict:
    """One method's runs at one grid point: ``runs``, each metric's ``_mean``, ``_std``,
    ``_lo``, ``_hi`` (95 % t-interval over seeds; nan for one run or a metric the runs lack)
    and the mean seconds per stage."""
    row: dict = {"runs": len(runs)}
    for k in TABLE_METRICS:
        vals = np.array([r.get(k, math.nan) for r in runs], float)
        mean, lo, hi = t_interval(vals)
        row[f"{k}_mean"] = mean
        row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
    for stage in PER_RUN:
        row[f"{stage}_seconds"] = float(np.mean([r[f"{stage}_seconds"] for r in runs]))
    return row


def seed_test(runs: list[dict], base: list[dict], metric: str, bootstrap: int = 0) -> dict:
    """The seed-level comparison of ``runs`` with ``base`` on ``metric``: the means, the
    runs per arm and :func:`welch` (with ``bootstrap`` > 0 also :func:`cluster_bootstrap`'s
    interval, ``boot_lo`` / ``boot_hi``)."""
    a = np.array([r.get(metric, math.nan) for r in runs], float)
    b = np.array([r.get(metric, math.nan) for r in base], float)
    out = {
        "metric": metric,
        "runs": len(a),
        "baseline_runs": len(b),
        "mean": float(a.mean()),
        "baseline_mean": float(b.mean()),
        **welch(a, b),
    }
    if bootstrap > 0 and "note" not in out and np.isfinite(out["mean_diff"]):
        out["boot_lo"], out["boot_hi"] = cluster_bootstrap(
            _per_user(runs, metric), _per_user(base, metric), bootstrap
        )
    return out


def summarise(
    rows: list[dict],
    methods: list[str],
    keys: Sequence[str] = (),
    baseline: str = "random",
    bootstrap: int = 0,
) -> tuple[list, list]:
    """Per (grid point, method) the summary over seeds (:func:`summary_row`), and per method
    and metric the seed-level comparison with ``baseline`` at the same grid point
    (:func:`seed_test`: Welch's t over the seeds each arm ran; the arms share no data).

    Args:
      rows: the finished runs (``method``, ``seed``, the swept ``keys``, the metrics).
      methods: the methods, in table order.
      keys: the swept keys.
      baseline: the method the others are compared with.
      bootstrap: > 0: also a cluster bootstrap over seeds and users with this many draws.
    Returns:
      ``(table, tests)``.
    """
    table, tests = [], []
    for point, by_method in _groups(rows, list(keys)).items():
        fields = dict(zip(keys, point))
        base = by_method.get(baseline, [])
        for m in [m for m in methods if m in by_method]:
            table.append({**fields, "method": m, **summary_row(by_method[m])})
            if m == baseline or not base:
                continue
            for k in TABLE_METRICS:
                if any(k not in r for r in by_method[m] + base):
                    continue  # rows archived without a test loss: no test of it
                test = seed_test(by_method[m], base, k, bootstrap)
                tests.append({**fields, "method": m, "baseline": baseline, **test})
    return table, tests


def _seed_mean(runs: list[dict], seeds: list[int]) -> tuple[np.ndarray, dict]:
    """Per-user metrics averaged over ``seeds`` (users in row order); ``runs`` hold a run of
    each of ``seeds``."""
    total: dict[str, np.ndarray] = {}
    users = None
    for r in (r for r in runs if r["seed"] in seeds):
        rows, values = run_user_metrics(r)
        order = np.argsort(rows)
        if users is not None and not np.array_equal(users, rows[order]):
            raise UserError(f"{r['predictions']}: evaluated other users than the other runs")
        users = rows[order]
        for k in METRICS:
            total[k] = total.get(k, 0.0) + values[k][order] / len(seeds)
    assert users is not None  # seeds is not empty and every seed has a run
    return users, total


def user_tests(
    rows: list[dict], methods: list[str], keys: Sequence[str] = (), baseline: str = "random"
) -> list[dict]:
    """Per-user paired tests against ``baseline`` (each user's metric averaged over the seeds
    both methods ran): paired t-test and Wilcoxon signed-rank test, pairs = users. Each row
    has the method's mean (``mean``) and the baseline's (``baseline_mean``)."""
    from scipy import stats  # here: scipy.stats would add seconds to every dealrec start

    out = []
    for point, by_method in _groups(rows, list(keys)).items():
        if baseline not in by_method:
            continue
        for m in [m for m in methods if m in by_method and m != baseline]:
            seeds = sorted(
                {r["seed"] for r in by_method[m]} & {r["seed"] for r in by_method[baseline]}
            )
            if not seeds:
                continue
            users, a = _seed_mean(by_method[m], seeds)
            _, b = _seed_mean(by_method[baseline], seeds)
            for k in METRICS:
                d = a[k] - b[k]
                nonzero = np.any(d != 0)
                t, p_t = stats.ttest_rel(a[k], b[k]) if nonzero else (np.nan, np.nan)
                p_w = stats.wilcoxon(a[k], b[k]).pvalue if nonzero else np.nan
                out.append(
                    {
                        **dict(zip(keys, point)),
                        "method": m,
                        "metric": k,
                        "n_users": len(users),
                        "seeds": len(seeds),
                        "mean": float(a[k].mean()),
                        "baseline": baseline,
                        "baseline_mean": float(b[k].mean()),
                        "mean_diff": float(d.mean()),
                        "better": int((d > 0).sum()),
                        "worse": int((d < 0).sum()),
                        "t": float(t),
                        "p_ttest": float(p_t),
                        "p_wilcoxon": float(p_w),
                    }
                )
    return out
