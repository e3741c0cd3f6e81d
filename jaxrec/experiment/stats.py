"""Statistics of an experiment's runs: per method the summary over seeds, per comparison with
the baseline the tests over seeds, and the per-user tests (conditional on the trained models)."""

from __future__ import annotations

import numpy as np

from jaxrec.errors import UserError
from jaxrec.experiment.grid import METRICS, PER_RUN
from jaxrec.experiment.rows import run_user_metrics


def _groups(rows: list[dict], keys: list[str]) -> dict[tuple, dict[str, list[dict]]]:
    """``{point: {method: [rows sorted by seed]}}``."""
    out: dict[tuple, dict[str, list[dict]]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        point = tuple(r[k] for k in keys)
        out.setdefault(point, {}).setdefault(r["method"], []).append(r)
    return out


def summarise(
    rows: list[dict], methods: list[str], keys: list[str] = (), baseline: str = "random"
) -> tuple[list, list]:
    """Per (grid point, method) mean/std table, and paired t-tests against ``baseline`` over
    seeds (pairs = seeds both ran)."""
    from scipy import stats

    table, tests = [], []
    for point, by_method in _groups(rows, list(keys)).items():
        base = {r["seed"]: r for r in by_method.get(baseline, [])}
        for m in [m for m in methods if m in by_method]:
            runs = by_method[m]
            row = {**dict(zip(keys, point)), "method": m, "runs": len(runs)}
            for k in METRICS:
                vals = np.array([r[k] for r in runs], float)
                row[f"{k}_mean"] = float(vals.mean())
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            for stage in PER_RUN:
                row[f"{stage}_seconds"] = float(np.mean([r[f"{stage}_seconds"] for r in runs]))
            table.append(row)
            if m == baseline or not base:
                continue
            paired = [(r, base[r["seed"]]) for r in runs if r["seed"] in base]
            for k in METRICS:
                a = np.array([p[0][k] for p in paired])
                b = np.array([p[1][k] for p in paired])
                t, p = (
                    stats.ttest_rel(a, b)
                    if len(a) >= 2 and np.any(a != b)
                    else (float("nan"), float("nan"))
                )
                tests.append(
                    {
                        **dict(zip(keys, point)),
                        "method": m,
                        "metric": k,
                        "n_pairs": len(a),
                        "mean_diff": float(np.mean(a - b)),
                        "t": float(t),
                        "p": float(p),
                    }
                )
    return table, tests


def _seed_mean(runs: list[dict], seeds: list[int]) -> tuple[np.ndarray, dict]:
    """Per-user metrics averaged over ``seeds`` (users in row order)."""
    total, users = {}, None
    for r in (r for r in runs if r["seed"] in seeds):
        rows, values = run_user_metrics(r)
        order = np.argsort(rows)
        if users is not None and not np.array_equal(users, rows[order]):
            raise UserError(f"{r['predictions']}: evaluated other users than the other runs")
        users = rows[order]
        for k in METRICS:
            total[k] = total.get(k, 0.0) + values[k][order] / len(seeds)
    return users, total


def user_tests(
    rows: list[dict], methods: list[str], keys: list[str] = (), baseline: str = "random"
) -> list[dict]:
    """Per-user paired tests against ``baseline`` (each user's metric averaged over the seeds
    both methods ran): paired t-test and Wilcoxon signed-rank test, pairs = users. Each row
    has the method's mean (``mean``) and the baseline's (``baseline_mean``)."""
    from scipy import stats

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
