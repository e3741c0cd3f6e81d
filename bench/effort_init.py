"""What effort at initialisation measures (issue 25): Spearman(effort, history length) and
Spearman(effort, influence) on Games, for TIGER's randomly initialised T5 and for BIGRec's
SmolLM2 with a fresh LoRA.

On a seeded sample of ``--n`` users (``--n-llm`` of them, the first in sample order, for the
slower SmolLM2, saved per 100 users so that a rerun continues):

* TIGER effort (paper Eq. 12 as ``dealrec effort --backend tiger``:
  :func:`llm_bridge.tiger.effort.score_samples`, all T5 parameters at ``init_seed`` 0) on
  each semantic-ID file of ``--semantic-ids`` (``random``: random unique codes);
* SmolLM2 effort (``dealrec effort``'s defaults: the embedded SmolLM2-135M-Instruct GGUF, a
  fresh LoRA of seed 0, all LoRA parameters, response-mean loss, cutoff 512 tokens;
  ``--autocast bf16`` by default, as ``bench/effort_seeds.py``, so approximate);
* influence (paper Eq. 11, ``dealrec influence`` defaults) from ``--influence FILE``, or else
  from a SASRec surrogate trained ``--surrogate-epochs`` epochs here
  (``dealrec train-surrogate`` then ``dealrec influence``, as subprocesses);

then the Spearman correlations of each effort with the user's number of train items, with its
input length (TIGER: history items, at most 20; SmolLM2: prompt tokens after the cut), with
influence, and of the two efforts with each other. Each part's scores are kept in ``OUT`` and
reused on a rerun.

    DEALREC_TORCH_THREADS=1 OMP_NUM_THREADS=1 nice -n 15 python bench/effort_init.py \\
        --semantic-ids runs/semantic_ids.npy [random] --out runs/effort_init [--influence FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, *args, **kw):
    """``(result, wall seconds, CPU seconds of this process)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, round(time.perf_counter() - w, 1), round(time.process_time() - c, 1)


def tiger_effort(ds, rows, semantic_ids: str, seed: int) -> np.ndarray:
    """TIGER's effort of ``rows`` at the T5's initialisation (``init_seed = seed``)."""
    import torch

    from llm_bridge.tiger.effort import score_samples
    from llm_bridge.tiger.finetune import load_codes
    from llm_bridge.tiger.model import build_model, item_tokens, user_samples

    torch.set_num_threads(1)
    codes, sizes = load_codes(semantic_ids, ds)
    inputs, targets, kept = user_samples(ds, rows, item_tokens(codes, sizes), 20, "train")
    assert kept.tolist() == list(rows)
    model = build_model(sizes, seed, "cpu").eval()
    return score_samples(model, inputs, targets, batch_size=64)


def llm_effort(ds, rows, autocast: str, seed: int, folder: Path, chunk: int = 100) -> None:
    """SmolLM2's effort of ``rows`` with a fresh LoRA of ``seed`` (``dealrec effort``'s
    defaults) and each sample's token count, saved per ``chunk`` users in ``folder`` (a rerun
    continues after the last chunk written)."""
    import torch

    from llm_bridge.config import EffortConfig
    from llm_bridge.bigrec import scoring_model
    from llm_bridge.effort import score_samples
    from llm_bridge.prompts import encode_users

    torch.set_num_threads(1)
    cfg = EffortConfig(device="cpu", seed=seed, autocast=autocast)
    tokenizer, model, _ = scoring_model(cfg, "cpu", ds)
    folder.mkdir(parents=True, exist_ok=True)
    for a in range(0, len(rows), chunk):
        path = folder / f"{a:06d}.npz"
        if path.is_file():
            continue
        samples = encode_users(
            tokenizer, ds, rows[a : a + chunk], cutoff_len=cfg.cutoff_len, train_on_inputs=False
        )
        scores = score_samples(
            model,
            samples,
            pad_id=tokenizer.pad_token_id,
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
            autocast=autocast,
            loss=cfg.loss,
        )
        tokens = np.asarray([len(s["input_ids"]) for s in samples])
        np.savez(path.with_suffix(".tmp.npz"), effort=scores, tokens=tokens)
        os.replace(path.with_suffix(".tmp.npz"), path)
        print(f"smollm2 effort: {a + len(samples)} of {len(rows)} users", flush=True)


def llm_scores(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The chunks written so far, in sample order: ``(effort, tokens)``."""
    parts = [np.load(f) for f in sorted(folder.glob("[0-9]*.npz"))]
    if not parts:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return tuple(np.concatenate([z[k] for z in parts]) for k in ("effort", "tokens"))


def influence_file(data: str, out: Path, epochs: int) -> Path:
    """``dealrec train-surrogate --epochs E`` then ``dealrec influence`` (defaults) in ``out``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    }
    run, scores = out / "surrogate", out / "influence.npy"
    cli = [sys.executable, "-m", "jaxrec.cli"]
    if not scores.is_file():
        subprocess.run(
            [*cli, "train-surrogate", "--data", data, "--out", str(run), "--epochs", str(epochs)],
            check=True,
            env=env,
        )
        subprocess.run(
            [*cli, "influence", "--run", str(run), "--data", data, "--out", str(scores)],
            check=True,
            env=env,
        )
    return scores


def rho(a, b) -> float:
    return round(float(spearmanr(a, b).statistic), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/games")
    ap.add_argument(
        "--semantic-ids",
        nargs="+",
        default=["random"],
        help="semantic-ID files; 'random' = random unique codes (bench/tiger.py)",
    )
    ap.add_argument("--influence", default="", help="an influence .npy of all users; else train")
    ap.add_argument("--surrogate-epochs", type=int, default=10)
    ap.add_argument("--n", type=int, default=2000, help="users in the seeded sample")
    ap.add_argument("--n-llm", type=int, default=1000, help="of them, scored with SmolLM2")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument("--autocast", default="bf16", help="SmolLM2 effort: bf16 or '' (exact)")
    ap.add_argument("--parts", default="tiger,llm,influence")
    ap.add_argument("--out", default="runs/effort_init")
    args = ap.parse_args()

    from jaxrec.data import load_dataset, load_scores, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.data)
    rows = np.random.default_rng(args.seed).choice(ds.n_users, args.n, replace=False)
    n_train = np.asarray([len(ds.train[r]) for r in rows])
    hist = np.minimum(n_train - 1, 20)
    res = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "n": args.n,
        "n_llm": args.n_llm,
        "seconds": {},
    }
    parts = args.parts.split(",")
    llm_dir = out / "smollm2_effort"
    tig_paths = {}  # label -> effort file
    for sid in args.semantic_ids:
        if sid == "random":
            sys.path.insert(0, str(ROOT / "bench"))
            from tiger import random_codes_file

            sid = str(random_codes_file(ds, out / "random_codes.npy"))
        label = Path(sid).parent.name + "/" + Path(sid).stem
        tig_paths[label] = out / f"tiger_effort-{label.replace('/', '-')}.npy"
        if "tiger" in parts and not tig_paths[label].is_file():
            t, w, c = timed(tiger_effort, ds, rows, sid, 0)
            np.save(tig_paths[label], t)
            res["seconds"][f"tiger_effort {label}"] = [w, c]
    if "llm" in parts:
        _, w, c = timed(llm_effort, ds, rows[: args.n_llm], args.autocast, 0, llm_dir)
        res["seconds"]["llm_effort"] = [w, c]
    inf = None
    if "influence" in parts:
        path = args.influence
        if not path:
            fresh, w = not (out / "influence.npy").is_file(), time.perf_counter()
            path = influence_file(args.data, out, args.surrogate_epochs)
            if fresh:
                res["seconds"]["surrogate_and_influence_wall"] = round(time.perf_counter() - w, 1)
        res["influence_file"] = str(path)
        inf = np.asarray(load_scores(path, kind="influence", dataset=ds.fingerprint())[0])[rows]
        res["spearman_influence_vs_train_items"] = rho(inf, n_train)
    res["tiger"] = {}
    for label, path in tig_paths.items():
        if path.is_file():
            t = np.load(path)
            res["tiger"][label] = {
                "vs_train_items": rho(t, n_train),
                "vs_history_items_max20": rho(t, hist),
                **({"vs_influence": rho(t, inf)} if inf is not None else {}),
            }
    e, tok = llm_scores(llm_dir)
    if k := len(e):
        res["smollm2"] = {
            "autocast": args.autocast,
            "users": k,
            "vs_train_items": rho(e, n_train[:k]),
            "vs_prompt_tokens": rho(e, tok),
            **({"vs_influence": rho(e, inf[:k])} if inf is not None else {}),
        }
        res["tiger_vs_smollm2"] = {
            label: rho(np.load(path)[:k], e) for label, path in tig_paths.items() if path.is_file()
        }
    write_json(out / "effort_init.json", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
