"""Damping sweep of exact influence on one LDS study folder (issue 27, section 3).

Does the damping decide the LDS of the Hessian-based estimators? This script rebuilds the
study's full model, data and validation users exactly as ``dealrec lds`` does
(:mod:`jaxrec.lds.study`), builds the parameter block's Hessian of the mean training loss once
(the ``exact`` estimator's: :func:`jaxrec.influence.exact.hessian_matrix`), eigendecomposes it,
and for a grid of effective dampings ``lam`` scores

    a[i, j] = factor * g_i . V (Lambda + lam)^-1 V^T g_j

from the eigenbasis (no solve per damping: two ``[n, d] @ [d, d]`` products once, then a
rescaling), with its LDS and bootstrap interval against the study's CACHED retrained losses
(:func:`jaxrec.lds.stats.score`; nothing is retrained: a missing retrain is an error). The
check: at the study's own damping it must reproduce the cached ``exact`` attribution, and the
training and validation gradients the cached ``grad-dot`` one (their maximum relative
differences, at most ``--tol`` (1e-2: the rebuilt model is the study's up to float32 training
noise, which grad-dot's own difference measures), and Spearman correlations are printed and
recorded). ``lam`` is the effective damping: under
``convention: dealrec`` the study's ``damping`` 0.01 is ``lam = scale * damping = 0.25``
(:func:`jaxrec.influence.attribution.effective_damping`); the factor (``scale``) is a positive
constant, which no Spearman correlation sees.

A second series, ``clipped``, repeats the sweep with the negative eigenvalues set to zero
(the positive part of ``H``, a cheap stand-in for a positive semi-definite curvature; not a
Gauss-Newton matrix).

    OMP_NUM_THREADS=1 taskset -c 0 nice -n 5 python bench/lds_damping.py \\
        --study /work/scratch-damping/sasrec_m100_s0 --out results/lds/sasrec_m100_s0 \\
        --hessian /work/scratch-damping/hessian_s0.npy

Writes ``OUT/damping.json`` (LDS vs damping, the spectrum, the checks) and ``OUT/damping.png``
(LDS with its interval vs ``lam`` on a log axis, grad-dot's and TracIn's LDS as lines; the
eigenvalue spectrum with the study's ``lam`` marked). ``--hessian FILE.npy`` keeps the Hessian
(float64, ``d x d``) so a rerun skips its ``d`` HVPs. Copy the study folder first: the rebuild
writes ``attributions/meta_*.json`` into it as the study does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# effective dampings of the sweep (the study's own is added)
GRID = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def eigen_attributions(
    g_train: np.ndarray,
    g_query: np.ndarray,
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    lam: float,
    factor: float = 1.0,
) -> np.ndarray:
    """``a [n, v] = factor * g_train V (Lambda + lam I)^-1 V^T g_query^T``: the exact influence
    of Koh & Liang 2017 (Eq. 2 without its minus sign, the LDS study's convention) with
    ``H = V Lambda V^T`` (``np.linalg.eigh``), for one damping ``lam``.

    Args:
      g_train: ``[n, d]`` training gradients; g_query: ``[v, d]`` query gradients.
      eigenvalues: ``[d]``; eigenvectors: ``[d, d]``, column ``k`` the ``k``-th eigenvector.
      lam: the effective damping added to every eigenvalue; factor: the convention's factor.
    Returns:
      ``[n, v]`` float64.
    """
    v = np.asarray(eigenvectors, np.float64)
    p = np.asarray(g_train, np.float64) @ v
    q = np.asarray(g_query, np.float64) @ v
    return factor * (p / (np.asarray(eigenvalues, np.float64) + lam)) @ q.T


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b| / max |b|``."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def spectrum(eig: np.ndarray, lam: float) -> dict:
    """Summary of the Hessian's eigenvalues against the effective damping ``lam``."""
    eig = np.asarray(eig, np.float64)
    return {
        "dim": int(eig.size),
        "min": float(eig.min()),
        "median": float(np.median(eig)),
        "max": float(eig.max()),
        "negative": int((eig < 0).sum()),
        "abs_below_1e-6": int((np.abs(eig) < 1e-6).sum()),
        "trace": float(eig.sum()),
        "lam": lam,
        "above_lam": int((eig > lam).sum()),
        "abs_above_lam": int((np.abs(eig) > lam).sum()),
        "quantiles": {str(q): float(np.quantile(eig, q)) for q in (0.01, 0.1, 0.5, 0.9, 0.99)},
    }


def study_config(folder: Path):
    """The study's :class:`~jaxrec.config.LdsConfig`: its ``results.json`` config (every
    option, scoring ones included), else its ``settings.json``; ``out`` = ``folder``."""
    import dataclasses

    from jaxrec.config import LdsConfig
    from jaxrec.config_io import make_config

    res = folder / "results.json"
    values = (
        json.loads(res.read_text())["config"]
        if res.is_file()
        else json.loads((folder / "settings.json").read_text())
    )
    cfg = make_config(LdsConfig, values, str(folder))
    return dataclasses.replace(cfg, out=str(folder))


# cached attributions that are ``factor (H + lam I)^-1`` with a known ``lam`` (the study's
# damping or ``small_damping``): the points of the sweep the study itself measured
INVERSES = {"exact": "damping", "cg": "damping", "lissa": "damping", "lissa-small": "small_damping"}
BASELINES = ("grad-dot", "tracin", "arnoldi", "kfac", "ekfac", "datainf", "grad-cos", "trak")


def study_inputs(cfg, progress: bool = False) -> dict:
    """The study's subsets, cached retrained losses and cached attributions, found as
    :func:`jaxrec.lds.study.run` finds them (its data slice, its fingerprints); nothing is
    trained or retrained (a missing retrain is an error)."""
    from jaxrec.errors import UserError
    from jaxrec.lds import study
    from jaxrec.lds.stats import draw_subsets

    out = Path(cfg.out)
    ds = study._dataset(cfg, out)
    masks = draw_subsets(ds.n_users, cfg.subsets, cfg.alpha, cfg.seed + 100)

    def refuse(mask, seed):
        raise UserError(f"{out}: a retrain (seed {seed}) is not cached; run dealrec lds first")

    cache = out / "retrained" / study._fingerprint(cfg, study._RETRAIN_KEYS | {"val_users"})
    losses = study.retrained_losses(refuse, masks, range(cfg.seeds), cache, progress=progress)
    fp = study._fingerprint(cfg, study._key_names(cfg, study._SCORING_ONLY | study._DEALREC_ONLY))
    files = {name: out / "attributions" / f"{name}_{fp}.npy" for name in cfg.attributions}
    cached = {k: np.load(f, allow_pickle=False) for k, f in files.items() if f.is_file()}
    if "exact" not in cached or "grad-dot" not in cached:
        raise UserError(f"{out}: no cached exact and grad-dot attributions to check against")
    return {"dataset": ds, "masks": masks, "losses": losses, "cached": cached, "fp": fp}


def rebuild(cfg, inputs: dict):
    """The study's full model and its parameter block as :func:`jaxrec.lds.study.run` builds
    them (its ``_Engine``: the surrogate retrained on every user, the strata, the chosen
    validation rows). Returns ``(engine, seconds)``."""
    from jaxrec.lds import study
    from jaxrec.retrain import surrogate_task

    ds = inputs["dataset"]
    t = time.perf_counter()
    task = surrogate_task(study.surrogate_config(cfg, str(ds.path)), ds)
    chosen = study._validation_users(cfg, len(task.valid["inputs"]))
    meta = Path(cfg.out) / "attributions" / f"meta_{inputs['fp']}.json"
    engine = study._Engine(cfg, task, chosen, meta)
    return engine, time.perf_counter() - t


def curvature_seen(cached: dict, lams: dict, factor: float) -> dict:
    """What the cached ``factor (H + lam I)^-1`` attributions say about the curvature along
    the gradients, with no Hessian: ``(H + lam)^-1 = (I - H / lam + ...) / lam``, so
    ``r = a lam / factor`` is grad-dot's ``G Q^T`` less ``G H Q^T / lam``. Per attribution:
    ``deviation = |r - G Q^T|_F / |G Q^T|_F`` (0: exactly grad-dot) and ``rayleigh = lam
    <G Q^T - r, G Q^T> / |G Q^T|^2`` (to first order ``<G H Q^T, G Q^T> / |G Q^T|^2``, the
    curvature the gradients see, in the units of the eigenvalues, to compare with ``lam``)."""
    dot = np.asarray(cached["grad-dot"], np.float64)
    out = {}
    for name, lam in lams.items():
        if name not in cached:
            continue
        r = np.asarray(cached[name], np.float64) * lam / factor
        out[name] = {
            "lam": lam,
            "deviation": float(np.linalg.norm(r - dot) / np.linalg.norm(dot)),
            "rayleigh": float(lam * np.sum((dot - r) * dot) / np.sum(dot * dot)),
        }
    return out


def flat_gradients(per_sample_loss, params, data, batch_size: int) -> np.ndarray:
    """``[n, d]`` float64: each row's gradient (:func:`jaxrec.influence.attribution.
    per_sample_gradients`, the data set's order) flattened as ``ravel_pytree`` orders the
    block (the Hessian's order)."""
    import jax
    from jax.flatten_util import ravel_pytree

    from jaxrec.influence.attribution import per_sample_gradients

    g = per_sample_gradients(per_sample_loss, params, data, batch_size)
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(g), np.float64)


def hessian(engine, cfg, path: str | None) -> tuple[np.ndarray, float]:
    """The block's Hessian of the mean training loss as the ``exact`` estimator builds it
    (:func:`jaxrec.influence.exact.hessian_matrix` of :class:`~jaxrec.influence.operator.
    FullHessian` over the study's strata, ``cfg.exact``'s batch size and chunk), read from /
    kept in ``path`` when given. Returns ``(H, seconds)`` (0 when read)."""
    from jaxrec.data.scorefiles import atomic_write_bytes
    from jaxrec.influence.exact import hessian_matrix
    from jaxrec.influence.operator import FullHessian

    if path and Path(path).is_file():
        return np.load(path, allow_pickle=False), 0.0
    t = time.perf_counter()
    op = FullHessian(engine.loss, engine.sub.params, engine.strata, cfg.exact.batch_size)
    h = hessian_matrix(op, cfg.exact.chunk)
    seconds = time.perf_counter() - t
    if path:
        atomic_write_bytes(Path(path), lambda fh: np.save(fh, h, allow_pickle=False))
    return h, seconds


def sweep(
    p: np.ndarray,
    q: np.ndarray,
    eig: np.ndarray,
    lams: list[float],
    factor: float,
    masks: np.ndarray,
    losses: np.ndarray,
    reference: dict[str, np.ndarray],
    kw: dict,
) -> list[dict]:
    """LDS of ``factor * (p / (eig + lam)) @ q.T`` (``p``, ``q`` the gradients in the
    eigenbasis) for every ``lam``, with its paired difference to each ``reference`` row."""
    from jaxrec.lds.stats import paired_difference, score, spearman_columns

    ref_scores = score(reference, masks, losses, **kw)
    rows = []
    for lam in lams:
        a = factor * (p / (eig + lam)) @ q.T
        s = score({"a": a}, masks, losses, **kw)["a"]
        row = {"lam": lam, **{k: s[k] for k in ("lds", "ci_low", "ci_high", "users")}}
        for name, r in reference.items():
            row[f"minus_{name}"] = paired_difference(
                s["per_user"], ref_scores[name]["per_user"], **kw
            )
            row[f"spearman_vs_{name}"] = float(spearman_columns(a.ravel(), r.ravel())[0])
        rows.append(row)
    return rows


def plot(result: dict, path: Path) -> None:
    """LDS (with interval) vs ``lam``, baselines as lines; the spectrum with ``lam`` marked
    (without a Hessian, ``--cached-only``: the cached points' deviation from grad-dot)."""
    from jaxrec.figures import _plt

    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    lam0 = result["study"]["lam"]
    for series, style in (("exact", "o-"), ("clipped", "s--")):
        rows = result.get("sweep", {}).get(series)
        if not rows:
            continue
        lam = np.array([r["lam"] for r in rows])
        lds = np.array([r["lds"] for r in rows])
        err = np.array([[r["lds"] - r["ci_low"], r["ci_high"] - r["lds"]] for r in rows]).T
        label = "exact (H + lam I)^-1" if series == "exact" else "clipped: max(H, 0) + lam I"
        ax.errorbar(lam, lds, yerr=err, fmt=style, capsize=3, label=label, ms=4)
    cached = result["cached"]
    for name, c in cached["curvature"].items():
        b = cached["lds"][name]
        ax.errorbar(
            [c["lam"]],
            [b["lds"]],
            yerr=[[b["lds"] - b["ci_low"]], [b["ci_high"] - b["lds"]]],
            fmt="x",
            capsize=3,
            label=f"cached {name}",
        )
    colors = {"grad-dot": "tab:gray", "tracin": "tab:green"}
    for name in ("grad-dot", "tracin"):
        if name in cached["lds"]:
            v = cached["lds"][name]["lds"]
            ax.axhline(v, ls=":", color=colors[name], label=f"{name} {v:.3f}")
    ax.axvline(lam0, color="tab:red", lw=0.8, label=f"study's lam = {lam0:g}")
    ax.set_xscale("log")
    ax.set_xlabel("effective damping lam")
    ax.set_ylabel("LDS (95% CI)")
    ax.set_title("influence (H + lam I)^-1 vs damping")
    ax.legend(fontsize=7)
    if "eigenvalues" in result:
        eig = np.sort(np.asarray(result["eigenvalues"]))[::-1]
        ks = np.arange(1, eig.size + 1)
        bx.loglog(ks[eig > 0], eig[eig > 0], ".", ms=2, label="eigenvalue > 0")
        bx.loglog(ks[eig < 0], -eig[eig < 0], ".", ms=2, color="tab:orange", label="|eig| < 0")
        bx.axhline(lam0, color="tab:red", lw=0.8, label=f"study's lam = {lam0:g}")
        bx.set_xlabel("rank")
        bx.set_ylabel("|eigenvalue| of H (block)")
        bx.set_title(f"Hessian spectrum (d = {eig.size})")
    else:
        cur = cached["curvature"]
        bx.loglog([c["lam"] for c in cur.values()], [c["deviation"] for c in cur.values()], "o")
        for name, c in cur.items():
            bx.annotate(name, (c["lam"], c["deviation"]), fontsize=7)
        if "exact" in cur:  # first order: deviation = rayleigh / lam
            grid = np.logspace(-4, 1, 50)
            r = cur["exact"]["rayleigh"]
            bx.loglog(grid, np.abs(r) / grid, ":", label=f"|rayleigh| / lam (rayleigh {r:.2g})")
            bx.axhline(1.0, color="k", lw=0.5)
        bx.set_xlabel("effective damping lam")
        bx.set_ylabel("|a lam / factor - G Q^T| / |G Q^T|")
        bx.set_title("cached attributions: distance from grad-dot")
    bx.legend(fontsize=7) if bx.get_legend_handles_labels()[0] else None
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row(r: dict, factor: float) -> str:
    d = r.get("minus_exact", {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0})
    return (
        f"| {r['lam']:g} | {r['lam'] / factor:g} | {r['lds']:.3f} | [{r['ci_low']:.3f}, "
        f"{r['ci_high']:.3f}] | {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/lds_damping.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    ap.add_argument("--study", required=True, help="an LDS study folder (a copy: see above)")
    ap.add_argument("--out", default="", help="where damping.json/.png go (default: --study)")
    ap.add_argument("--hessian", default="", help="keep / reuse the Hessian in this .npy")
    ap.add_argument("--lams", type=float, nargs="+", default=list(GRID), help="dampings lam")
    ap.add_argument("--batch-size", type=int, default=64, help="per-sample gradient batch")
    ap.add_argument("--tol", type=float, default=1e-2, help="max relative difference allowed")
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="no model, no Hessian: the cached attributions' LDS and curvature_seen only",
    )
    args = ap.parse_args(argv)

    from jaxrec.data.scorefiles import write_json
    from jaxrec.errors import UserError
    from jaxrec.influence.attribution import effective_damping
    from jaxrec.lds.stats import paired_difference, score

    folder = Path(args.study)
    out = Path(args.out or folder)
    try:
        cfg = study_config(folder)
        lam0, factor = effective_damping(cfg.damping, cfg.convention, cfg.scale)
        inputs = study_inputs(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    masks, losses, cached = inputs["masks"], inputs["losses"], inputs["cached"]
    kw = dict(resamples=cfg.bootstrap, level=cfg.level, seed=cfg.seed)
    lams = {
        k: effective_damping(getattr(cfg, v), cfg.convention, cfg.scale)[0]
        for k, v in INVERSES.items()
    }
    shown = [k for k in (*INVERSES, *BASELINES) if k in cached]
    scored = score({k: cached[k] for k in shown}, masks, losses, **kw)
    for k in shown:
        scored[k]["minus_exact"] = paired_difference(
            scored[k]["per_user"], scored["exact"]["per_user"], **kw
        )
    curvature = curvature_seen(cached, {k: v for k, v in lams.items() if k in cached}, factor)
    result: dict = {
        "study": {
            "folder": str(folder),
            "damping": cfg.damping,
            "small_damping": cfg.small_damping,
            "convention": cfg.convention,
            "scale": cfg.scale,
            "lam": lam0,
            "factor": factor,
            "params": cfg.params,
            "subsets": cfg.subsets,
            "seeds": cfg.seeds,
            "val_users": int(losses.shape[-1]),
        },
        "cached": {
            "lds": {
                k: {x: v[x] for x in ("lds", "ci_low", "ci_high", "users", "minus_exact")}
                for k, v in scored.items()
            },
            "curvature": curvature,
        },
    }
    print("| cached | lam | LDS | 95% CI | - exact [paired CI] | deviation from grad-dot |")
    print("|---|---|---|---|---|---|")
    for k in shown:
        v, c = scored[k], curvature.get(k)
        d = v["minus_exact"]
        lam = f"{c['lam']:g}" if c else "-"
        dev = f"{c['deviation']:.2e} (rayleigh {c['rayleigh']:.3g})" if c else "-"
        print(
            f"| {k} | {lam} | {v['lds']:.3f} | [{v['ci_low']:.3f}, {v['ci_high']:.3f}] | "
            f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | {dev} |"
        )
    if args.cached_only:
        write_json(out / "damping.json", result)
        plot(result, out / "damping.png")
        print(f"{out}: damping.json, damping.png (cached attributions only)")
        return 0

    from jaxrec.influence.cli import use_compile_cache

    use_compile_cache(cfg.compile_cache)  # as dealrec lds: the study's compiled steps
    e, train_seconds = rebuild(cfg, inputs)
    print(f"model rebuilt ({train_seconds:.0f} s); block of {e.sub.size} values", flush=True)
    t = time.perf_counter()
    g_train = flat_gradients(e.psl, e.sub.params, e.strata, args.batch_size)
    g_query = flat_gradients(e.psl, e.sub.params, e.valid, args.batch_size)
    grad_seconds = time.perf_counter() - t
    h, hessian_seconds = hessian(e, cfg, args.hessian or None)
    print(f"Hessian {h.shape} ({hessian_seconds:.0f} s; 0 = read from --hessian)", flush=True)
    eig, vec = np.linalg.eigh(h)
    p, q = g_train @ vec, g_query @ vec

    # the checks: the cached grad-dot and exact attributions of the study. The rebuilt model
    # is the study's up to float32 training noise (10 epochs amplify rounding that depends on
    # threads and XLA's fusion), so grad-dot's own difference is the floor the exact row
    # should sit on; the Spearman of each with its cached copy is recorded beside it.
    from jaxrec.lds.stats import spearman_columns

    mine = {
        "grad-dot": g_train @ g_query.T,
        "exact": eigen_attributions(g_train, g_query, eig, vec, lam0, factor),
    }
    checks = {k: max_relative_difference(v, cached[k]) for k, v in mine.items()}
    ranks = {k: float(spearman_columns(v.ravel(), cached[k].ravel())[0]) for k, v in mine.items()}
    for name, dif in checks.items():
        print(
            f"check: max relative difference to the cached {name} attribution: {dif:.2e} "
            f"(Spearman {ranks[name]:.6f})"
        )
    ok = all(dif <= args.tol for dif in checks.values())
    spec = spectrum(eig, lam0)
    print(
        f"spectrum: min {spec['min']:.3g}, median {spec['median']:.3g}, max {spec['max']:.3g};"
        f" {spec['negative']} negative of {spec['dim']}; {spec['above_lam']} above lam = "
        f"{lam0:g} ({spec['abs_above_lam']} with |eigenvalue| > lam)"
    )
    grid = sorted({*args.lams, lam0})
    reference = {"exact": cached["exact"], "grad-dot": cached["grad-dot"]}
    energy = (q**2).sum(0)  # the query gradients' energy per eigendirection
    result.update(
        {
            "checks": {
                "max_relative_difference": checks,
                "spearman_with_cached": ranks,
                "tol": args.tol,
                "passed": ok,
            },
            "spectrum": spec,
            "query_gradient_energy_where_abs_eig_above_lam": float(
                energy[np.abs(eig) > lam0].sum() / energy.sum()
            ),
            "sweep": {
                "exact": sweep(p, q, eig, grid, factor, masks, losses, reference, kw),
                "clipped": sweep(
                    p, q, np.maximum(eig, 0.0), grid, factor, masks, losses, reference, kw
                ),
            },
            "seconds": {
                "train_full": round(train_seconds, 1),
                "gradients": round(grad_seconds, 1),
                "hessian": round(hessian_seconds, 1),
            },
            "eigenvalues": eig.tolist(),
        }
    )
    write_json(out / "damping.json", result)
    plot(result, out / "damping.png")
    print("| lam | damping (lam / scale) | LDS | 95% CI | - exact [paired CI] | clipped LDS |")
    print("|---|---|---|---|---|---|")
    for r, c in zip(result["sweep"]["exact"], result["sweep"]["clipped"]):
        print(f"{_row(r, factor)} {c['lds']:.3f} |")
    print(f"{out}: damping.json, damping.png")
    if not ok:
        print(f"error: the check failed (tolerance {args.tol:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
