"""bench/gpu_check.sh, the one command for a lent GPU: its tiny CPU version runs every stage and
writes the JSON file (seconds, peak memory, device name) that the GPU version writes."""

import json
import os
import subprocess
import sys

from tests.support import ROOT

STAGES = [
    "surrogate_epoch",
    "influence",
    "effort_smollm2",
    "semantic_ids",
    "select_all",
    "tiger_finetune_epoch",
    "tiger_evaluate_test",
]


def test_tiny_gpu_check_runs_every_stage(tmp_path, smollm2):
    """Effort's two processes load SmolLM2 from the session's de-quantised folder (the
    ``smollm2`` fixture; --model): the same weights, without de-quantising the GGUF in each
    process (the GGUF path itself: tests/llm/test_llm_effort_accelerate.py's real-model test)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", "--out", str(out), "--work",
         str(tmp_path / "work"), "--model", str(smollm2[0])],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["mode"] == "tiny (CPU)" and result["device"].startswith("cpu")
    assert list(result["stages"]) == STAGES
    for name, stage in result["stages"].items():
        assert stage["rc"] == 0 and stage["seconds"] > 0, name
        assert stage["peak_device_bytes"] is None and stage["peak_rss_bytes"] > 0
    metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert metrics["backend"] == "tiger" and metrics["n_users"] > 0
    assert result["total_seconds"] >= sum(s["seconds"] for s in result["stages"].values()) - 0.1
