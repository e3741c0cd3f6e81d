"""``dealrec effort`` under ``accelerate launch`` with 2 CPU processes, and on the real SmolLM2."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset, load_scores
from jaxrec.data.synthetic import make_synthetic
from llm_bridge import effort
from llm_bridge.config import EffortConfig
from tests.support import GAMES, games_available, tiny_llama


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_accelerate_two_cpu_processes_match_one(tmp_path):
    data = make_synthetic(
        tmp_path / "data", n_users=17, n_items=30, n_clusters=3, max_len=6, seed=4
    )
    model = tiny_llama(tmp_path / "model")
    common = [
        "--data",
        str(data),
        "--model",
        str(model),
        "--shard-size",
        "3",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    single = tmp_path / "one" / "effort.npy"
    effort.main(
        EffortConfig(
            data=str(data),
            out=str(single),
            model=str(model),
            shard_size=3,
            batch_size=4,
            device="cpu",
            dtype="float32",
        )
    )
    out = tmp_path / "two" / "effort.npy"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        # (with --cpu accelerate's simple launcher starts ONE process; --multi_gpu starts two
        # with torchrun, which on a CPU-only machine run on the CPU over gloo)
        [
            shutil.which("accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29517",
            "-m",
            "jaxrec.cli",
            "effort",
            "--out",
            str(out),
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = load_dataset(data)
    scores, manifest = load_scores(out, kind="effort", dataset=ds.fingerprint())
    np.testing.assert_allclose(scores, np.load(single), rtol=1e-5)
    assert manifest["options"]["processes"] == 2 and manifest["shards"] == 6
    # each process wrote its own shards (round-robin): both ranks did work
    assert len(list((out.parent / "effort.npy.shards").glob("rows-*.json"))) == 6
    assert "effort[0]" in proc.stderr and "effort[1]" in proc.stderr  # one bar per process


@pytest.mark.slow
@pytest.mark.skipif(not games_available(), reason="Games data not found")
def test_real_smollm2_few_games_users(tmp_path, smollm2):
    """The embedded SmolLM2 GGUF scores 2 Games users (one batch; prompts cut to 192 tokens,
    the oldest titles dropped) like a batch-1 float32 autograd loop (on the same weights and
    tokenizer, de-quantised once for the session: the ``smollm2`` fixture)."""
    from llm_bridge.model import add_lora, load_tokenizer_and_model
    from llm_bridge.prompts import encode_sample, user_sample

    out = tmp_path / "effort.npy"
    effort.main(
        EffortConfig(
            data=str(GAMES),
            out=str(out),
            users="0:2",
            batch_size=2,
            cutoff_len=192,
            device="cpu",
            dtype="float32",
        )
    )
    ds = load_dataset(GAMES)
    assert not out.exists()  # only 2 of 49,156 rows: no merged file yet
    shard = out.with_name("effort.npy.shards") / "rows-00000000-00000002.npy"
    scores = np.load(shard)
    folder, info = smollm2  # info: of the GGUF load
    assert info["model_type"] == "llama" and info["n_params"] > 100_000_000
    tok, lm, _ = load_tokenizer_and_model(str(folder), device="cpu", dtype="float32")
    torch.manual_seed(0)
    lm = add_lora(lm)
    lm.eval()
    params = [p for p in lm.parameters() if p.requires_grad]
    assert len(params) == 30 * 4
    ref, lengths = [], set()
    for row in range(2):
        s = encode_sample(tok, *user_sample(ds, row), cutoff_len=192)
        lengths.add(len(s["input_ids"]))
        loss = lm(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])).loss
        ref.append(
            float(torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params))))
        )
    assert np.all(np.asarray(ref) > 0) and len(lengths) == 2  # the batch is padded
    np.testing.assert_allclose(scores, ref, rtol=1e-4)
