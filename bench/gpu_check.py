"""Every stage on one device, timed: the one command to run when a GPU is lent (see
bench/gpu_check.sh, which calls this).

On a machine where ``nvidia-smi`` works it runs on the full Games data (``--data``):

1. ``train-surrogate``: one epoch of SASRec on every user (then its valid evaluation);
2. ``influence``: every user's influence over all parameters, default solver and the default
   32 negative draws;
3. ``effort``: SmolLM2-135M-Instruct (the embedded BIGRec LLM) on users 0..4095;
4. ``semantic-ids``: TIGER's codes by residual k-means (the cheap method; a prerequisite);
5. ``select --method all`` and ``finetune --backend tiger``: one fine-tune epoch on every user;
6. ``evaluate --backend tiger``: constrained beam search (20 beams) for every test user.

Elsewhere (``--tiny``, the default without a GPU) the same stages run on a 60-user synthetic
dataset with a few steps each, so a test checks the script itself in about a minute.

Each stage is a ``dealrec`` command in its own process (as ``dealrec run`` runs them), timed
from outside; inside, after the command, it reports the peak device memory of the framework it
used (JAX ``peak_bytes_in_use``, torch ``max_memory_allocated``) and its peak RSS. One JSON
file collects them with the device name: ``{"device", "mode", "stages": {name: {"seconds",
"peak_device_bytes", "peak_rss_bytes", "rc", "argv"}}, "total_seconds", "budget_seconds",
"within_budget"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 480.0  # seconds: the whole check on one GPU


def child(argv: list[str]) -> int:
    """Run ``dealrec ARGV`` in this process, then print one JSON line of peak memory."""
    sys.path.insert(0, str(ROOT))
    from jaxrec.cli import main

    rc = main(argv)
    peak, device = None, None
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
            device = torch.cuda.get_device_name(0)
    if "jax" in sys.modules:
        import jax

        d = jax.devices()[0]
        stats = d.memory_stats() if d.platform != "cpu" else None
        if stats:
            peak = max(peak or 0, int(stats.get("peak_bytes_in_use", 0)))
            device = device or d.device_kind
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print("GPU_CHECK " + json.dumps({"peak_device_bytes": peak, "device": device, "rss": rss}))
    return rc


def stages(data: str, work: Path, tiny: bool, model: str = "") -> list[tuple[str, list[str]]]:
    """``[(name, dealrec argv)]`` of the check, full Games or ``tiny``; ``model``: effort's
    ``--model`` (``""``: the embedded SmolLM2 GGUF, de-quantised by each effort process)."""
    w = str(work)
    codes, sel = f"{w}/codes.npy", f"{w}/selected.npy"
    surrogate = ["--epochs", "1", "--no-resume"] + (["--batch-size", "32"] if tiny else [])
    influence = ["--steps", "20", "--lissa-batch-size", "8"] if tiny else []
    users = "0:2" if tiny else "0:4096"  # tiny: 2 SmolLM2 backward passes, not 8
    effort = (
        ["--cutoff-len", "128", "--batch-size", "2"]
        if tiny
        else ["--batch-size", "64", "--max-tokens", "32768"]  # the CPU default caps at 1024
    )
    effort += ["--model", model] if model else []
    sids = ["--codebook-size", "4"] if tiny else []
    batch = "16" if tiny else "256"
    tiger = ["--backend", "tiger", "--data", data, "--semantic-ids", codes]
    return [
        ("surrogate_epoch", ["train-surrogate", "--data", data, "--out", f"{w}/surrogate"]
         + surrogate),
        ("influence", ["influence", "--run", f"{w}/surrogate", "--out", f"{w}/influence.npy"]
         + influence),
        ("effort_smollm2", ["effort", "--data", data, "--out", f"{w}/effort.npy", "--users",
                            users, "--no-resume", *effort]),
        ("semantic_ids", ["semantic-ids", "--data", data, "--out", codes, "--method", "rkmeans",
                          "--cache-dir", f"{w}/cache", *sids]),
        ("select_all", ["select", "--data", data, "--method", "all", "--out", sel]),
        ("tiger_finetune_epoch", ["finetune", *tiger, "--selection", sel, "--out", f"{w}/tiger",
                                  "--epochs", "1", "--lr", "1e-3", "--batch-size", batch,
                                  "--grad-accum", "1", "--no-resume"]),
        ("tiger_evaluate_test", ["evaluate", *tiger, "--adapter", f"{w}/tiger", "--split",
                                 "test", "--beams", "20", "--batch-size", batch, "--out",
                                 f"{w}/metrics.json"]),
    ]  # fmt: skip


def has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except OSError:
        return False


def run_check(
    out: Path,
    data: str = "",
    tiny: bool | None = None,
    work: Path | None = None,
    model: str = "",
) -> dict:
    """Run every stage (see the module docstring), write ``out`` and return its dict.
    ``model``: the effort stage's ``--model`` (default: the embedded SmolLM2 GGUF)."""
    tiny = (not has_gpu()) if tiny is None else tiny
    work = Path(work or tempfile.mkdtemp(prefix="gpu_check-"))
    if tiny and not data:
        sys.path.insert(0, str(ROOT))
        from jaxrec.data.synthetic import make_synthetic

        data = str(make_synthetic(work / "data", n_users=60, n_items=30, max_len=8, seed=0))
    data = data or str(ROOT / ".." / "shared" / "data" / "games")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = {"mode": "tiny (CPU)" if tiny else "full Games", "data": data, "stages": {}}
    device = None
    t_all = time.perf_counter()
    for name, argv in stages(data, work, tiny, model):
        print(f"gpu_check: {name}: dealrec {' '.join(argv)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
            text=True,
        )
        seconds = time.perf_counter() - t0
        report = {}
        for line in proc.stdout.splitlines():
            if line.startswith("GPU_CHECK "):
                report = json.loads(line.removeprefix("GPU_CHECK "))
        device = device or report.get("device")
        result["stages"][name] = {
            "seconds": round(seconds, 2),
            "peak_device_bytes": report.get("peak_device_bytes"),
            "peak_rss_bytes": report.get("rss"),
            "rc": proc.returncode,
            "argv": ["dealrec", *argv],
        }
        print(f"gpu_check: {name}: {seconds:.1f} s, rc {proc.returncode}", file=sys.stderr)
        if proc.returncode != 0:
            break  # later stages need this one's output
    total = time.perf_counter() - t_all
    result.update(
        device=device
        or f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)",
        total_seconds=round(total, 2),
        budget_seconds=BUDGET,
        within_budget=total <= BUDGET and all(s["rc"] == 0 for s in result["stages"].values()),
        ok=len(result["stages"]) == len(stages(data, work, tiny, model))
        and all(s["rc"] == 0 for s in result["stages"].values()),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "gpu_check.json"))
    p.add_argument(
        "--data", default="", help="dataset folder (default: full Games; tiny: synthetic)"
    )
    p.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    p.add_argument(
        "--model",
        default="",
        help="the effort stage's model (default: the embedded SmolLM2 GGUF; the same model "
        "saved as a Hugging Face folder loads without de-quantising it in each process)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", default=None, help="the tiny CPU version")
    mode.add_argument("--full", action="store_false", dest="tiny", help="full Games even on a CPU")
    args = p.parse_args()
    work = Path(args.work) if args.work else None
    result = run_check(Path(args.out), args.data, args.tiny, work, args.model)
    print(json.dumps({k: result[k] for k in ("device", "mode", "total_seconds", "ok")}))
    print(f"gpu_check: wrote {args.out}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
