"""How cost grows with the data: Games-like synthetic datasets of 1x, 4x, 16x the users.

For each factor k: a synthetic dataset with ``k * 49,156`` users and ``k * 17,332`` items
(``k * 200`` item clusters; train sequences of 3-9 items, mean 6 as on Games); a factor
written ``ku`` (say ``16u``) scales the users only and keeps Games' 17,332 items, which
separates the cost of more users from the cost of a larger item table. Then, each in
a fresh process:

* the surrogate epoch time (SASRec as ``dealrec train-surrogate``, two epochs, the second is
  the steady state; no ranking evaluation, which is not part of an epoch), saved as a run;
* ``dealrec influence`` (all parameters, defaults, cold: no compilation cache), wall time and
  peak resident memory (``/usr/bin/time -v``);
* the peak resident memory of only loading that run (the data itself and the model), so the
  influence stage's own memory is the difference.

    python bench/scale.py --factors 1 4 16 --out runs/scale [--json runs/scale.json]
    python bench/scale.py --plot runs/scale.json --figure docs/figures/scale.png   # table + plot
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

GAMES_USERS, GAMES_ITEMS = 49_156, 17_332


def sizes(factor: str) -> tuple[int, int, int]:
    """``(users, items, item clusters)`` of a factor ``k`` (users and items scaled) or ``ku``
    (users only)."""
    k = int(factor.rstrip("u"))
    j = 1 if factor.endswith("u") else k
    return k * GAMES_USERS, j * GAMES_ITEMS, 200 * j


def make_data(folder: Path, factor: str) -> Path:
    from jaxrec.data.synthetic import make_synthetic

    users, items, clusters = sizes(factor)
    seed = users // GAMES_USERS  # k
    if not (folder / "items.jsonl").is_file():
        make_synthetic(
            folder,
            n_users=users,
            n_items=items,
            n_clusters=clusters,
            min_len=3,
            max_len=9,
            seed=seed,
        )
    return folder


def train_two_epochs(data: Path, run: Path) -> list[float]:
    """Two epochs of surrogate training (the CLI's step and batching); saves ``run`` so
    ``load_surrogate`` reads it. Returns the seconds of each epoch."""
    import dataclasses

    import jax
    import numpy as np
    import optax

    from jaxrec import train as T
    from jaxrec.config import SurrogateConfig
    from jaxrec.data import load_dataset, training_arrays, write_json
    from jaxrec.models import sasrec

    cfg = SurrogateConfig(data=str(data), out=str(run), epochs=2)
    ds = load_dataset(data)
    model = T.build_model(cfg, ds.n_items)
    optimizer = optax.adam(cfg.lr)
    params = sasrec.init_params(model, jax.random.PRNGKey(0))
    opt_state = optimizer.init(params)
    step = T.make_train_step(model, optimizer)
    arrays = training_arrays(ds, cfg.max_len)
    rng, key, seconds = np.random.default_rng(0), jax.random.PRNGKey(1), []
    for epoch in (1, 2):
        t0 = time.perf_counter()
        data_e = T.training_data(cfg, arrays, ds, epoch)
        params, opt_state, key, _ = T.train_epoch(step, params, opt_state, key, data_e, cfg, rng)
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - t0)
    run.mkdir(parents=True, exist_ok=True)
    T.save_checkpoint(run / "checkpoints" / "best", params)
    write_json(run / "config.json", dataclasses.asdict(cfg))
    return seconds


def timed(argv: list[str]) -> dict:
    """Run ``argv`` under ``/usr/bin/time -v``: wall seconds and peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{argv} failed:\n{proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(rss / 1024, 1),
        "stdout": proc.stdout.strip()[-300:],
    }


def epoch(r: dict) -> float:
    """Steady-state surrogate epoch seconds (the second epoch) of one result."""
    return r["epoch_seconds"][-1]


def infl(r: dict) -> float:
    """Wall seconds of the cold ``dealrec influence`` run of one result."""
    return r["influence"]["wall_s"]


def report(results: dict) -> str:
    """A Markdown table of ``results``, with per-user costs relative to the smallest run."""
    rows = sorted(results.values(), key=lambda r: r["users"])
    base = rows[0]

    def per_user(r, seconds):
        return seconds(r) / r["users"]

    lines = [
        "| users | items | parameters | epoch s | epoch us/user (vs 1x) | influence s | "
        "influence us/user (vs 1x) | mean grad / solve / scores s | LiSSA steps | "
        "peak RSS influence MiB | of it, loading the run MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["influence"]["timing"]
        lines.append(
            f"| {r['users']:,} | {r['items']:,} | {r['influence']['n_params']:,} | "
            f"{epoch(r):.1f} | {1e6 * per_user(r, epoch):.0f} "
            f"({per_user(r, epoch) / per_user(base, epoch):.2f}x) | {infl(r):.0f} | "
            f"{1e6 * per_user(r, infl):.0f} ({per_user(r, infl) / per_user(base, infl):.2f}x) | "
            f"{t['mean_gradient']:.0f} / {t['solve']:.0f} / {t['scores']:.0f} | "
            f"{r['influence']['steps_run'][0]} | {r['influence']['peak_rss_mib']:,.0f} | "
            f"{r['load_only_peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines)


def draw(results: dict, figure: str) -> None:
    """Seconds (log-log) and peak memory against users: the ``k`` factors as lines, the
    users-only factors (``ku``) as open markers at Games' item count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = sorted((r for f, r in results.items() if not f.endswith("u")), key=lambda r: r["users"])
    only = sorted((r for f, r in results.items() if f.endswith("u")), key=lambda r: r["users"])
    base = both[0]
    curves = {"surrogate epoch": (epoch, "o", "C0"), "influence stage (cold)": (infl, "s", "C1")}
    memory = {
        "influence stage, peak RSS": (lambda r: r["influence"]["peak_rss_mib"] / 1024, "s", "C1"),
        "loading the run only": (lambda r: r["load_only_peak_rss_mib"] / 1024, "o", "C2"),
        "surrogate training, peak RSS": (lambda r: r["train_peak_rss_mib"] / 1024, "^", "C0"),
    }
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, series in ((a, curves), (b, memory)):
        for label, (f, marker, color) in series.items():
            ax.plot(
                [r["users"] for r in both],
                [f(r) for r in both],
                marker + "-",
                color=color,
                label=label + " (items scaled too)",
            )
            if only:
                ax.plot(
                    [r["users"] for r in only],
                    [f(r) for r in only],
                    marker,
                    color=color,
                    mfc="none",
                    ms=9,
                    label=label + " (users only)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("users")
        # the measured sizes as plain numbers; matplotlib's minor 3x10^5, 4x10^5 overlapped
        sizes = sorted({r["users"] for r in both + only})
        ax.set_xticks(sizes, [f"{u:,}" for u in sizes])
        ax.minorticks_off()
    users = [r["users"] for r in both]
    for f, _, _ in curves.values():
        a.plot(users, [f(base) * u / base["users"] for u in users], "k:", lw=0.8)
    a.set(yscale="log", ylabel="seconds", title="time (dotted: linear in users from 1x)")
    b.set(ylabel="GiB", title="peak resident memory", ylim=(0, None))
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", nargs="+", default=["1", "4", "16"], help="k or ku (users only)")
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--json", default="runs/scale.json")
    ap.add_argument("--plot", default="", help="print the table of this JSON, draw --figure")
    ap.add_argument("--figure", default="")
    ap.add_argument("--stage", default="", help=argparse.SUPPRESS)  # internal: train in-process
    args = ap.parse_args()
    if args.plot:
        results = json.loads(Path(args.plot).read_text())
        print(report(results))
        if args.figure:
            draw(results, args.figure)
        return 0
    out = Path(args.out)
    if args.stage:  # child process: python bench/scale.py --stage k
        k = args.stage
        print(json.dumps(train_two_epochs(out / f"x{k}" / "data", out / f"x{k}" / "run")))
        return 0
    results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    for k in args.factors:
        folder = out / f"x{k}"
        t0 = time.perf_counter()
        make_data(folder / "data", k)
        r = {
            "users": sizes(k)[0],
            "items": sizes(k)[1],
            "data_seconds": round(time.perf_counter() - t0, 1),
        }
        train = timed([sys.executable, __file__, "--out", str(out), "--stage", str(k)])
        r["epoch_seconds"] = json.loads(train["stdout"].splitlines()[-1])
        r["train_peak_rss_mib"] = train["peak_rss_mib"]
        run = folder / "run"
        load = timed(
            [
                sys.executable,
                "-c",
                "import sys; from jaxrec.train import load_surrogate; load_surrogate(sys.argv[1])",
                str(run),
            ]
        )
        r["load_only_peak_rss_mib"] = load["peak_rss_mib"]
        inf = timed(
            [
                sys.executable,
                "-m",
                "jaxrec.cli",
                "influence",
                "--run",
                str(run),
                "--out",
                str(run / "influence.npy"),
                "--compile-cache",
                "",
            ]
        )
        manifest = json.loads((run / "influence.json").read_text())
        r["influence"] = {
            "wall_s": inf["wall_s"],
            "peak_rss_mib": inf["peak_rss_mib"],
            "timing": manifest["timing"],
            "n_params": manifest["n_params"],
            "steps_run": manifest["solver"]["steps_run"],
        }
        results[f"x{k}"] = r
        print(json.dumps({f"x{k}": r}), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
