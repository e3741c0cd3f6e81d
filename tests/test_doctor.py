"""``dealrec doctor``: what each side will run on, and the warning when a GPU goes unused."""

import json
from pathlib import Path

from jaxrec.cli import main
from jaxrec.doctor import lines, warnings


def test_doctor_reports_what_each_side_runs_on(capsys):
    import jax
    import torch

    from llm_bridge.runtime import resolve_device_dtype

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["jax"]["backend"] == jax.default_backend()
    assert report["jax"]["version"] == jax.__version__
    device, dtype = resolve_device_dtype("auto", "auto")
    assert report["torch"]["device"] == str(device)
    assert report["torch"]["dtype"] == str(dtype).removeprefix("torch.")
    assert report["torch"]["cuda"] == torch.cuda.is_available()
    assert report["cpu_threads"] >= 1 and report["memory_available"] > 0
    for where in report["models"].values():
        assert where.startswith("missing") or Path(where).is_file()
    shown = lines({k: v for k, v in report.items() if k != "warnings"})
    assert shown[0].startswith("JAX") and shown[1].startswith("torch")
    assert len(shown) <= 8


def test_a_gpu_that_jax_or_torch_will_not_use_is_a_warning():
    report = {
        "jax": {"version": "0.10", "backend": "cpu", "devices": ["cpu:cpu"]},
        "torch": {
            "version": "2.13.0+cpu",
            "cuda": False,
            "device": "cpu",
            "dtype": "float32",
            "gpu": None,
            "gpu_free": None,
            "threads": 16,
            "tiger_cpu_threads": 1,
        },
        "cpu_threads": 16,
        "memory_available": 2**37,
        "nvidia_gpus": [{"name": "NVIDIA H100", "free_mib": 80000, "total_mib": 81559}],
        "models": {"SmolLM2-135M-Instruct": "/x.gguf", "all-MiniLM-L6-v2": "/m.zip"},
        "environment": {},
    }
    found = warnings(report)
    assert len(found) == 2
    assert "JAX runs on the CPU" in found[0] and "jax[cuda12]" in found[0]
    assert "torch has no CUDA" in found[1]
    on_gpu = {
        **report,
        "jax": {**report["jax"], "backend": "gpu", "devices": ["gpu:NVIDIA H100"]},
        "torch": {**report["torch"], "cuda": True, "device": "cuda", "gpu": "NVIDIA H100"},
    }
    assert warnings(on_gpu) == []
    assert warnings({**report, "nvidia_gpus": []}) == []  # a CPU machine: nothing to warn
    assert lines(report)[-1].startswith("WARNING: ")
