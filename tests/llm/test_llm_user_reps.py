"""``dealrec user-reps`` (TF-DCon's LLM half) on a tiny random LLaMA: vectors against a batch-1
reference from transformers' own hidden states, the sharded/resumable score file, and its use by
``select --method tfdcon`` and by ``dealrec run`` / ``experiment``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jaxrec.cli import main as cli
from jaxrec.data import load_dataset, load_scores, save_scores
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from llm_bridge import user_reps
from llm_bridge.config import UserRepsConfig
from llm_bridge.model import load_tokenizer_and_model
from llm_bridge.prompts import build_prompt, collate, user_sample
from tests.support import tiny_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_reps")
    data = make_synthetic(
        root / "data", n_users=13, n_items=30, n_clusters=3, min_len=1, max_len=8, seed=5
    )
    model_dir = tiny_llama(root / "model")
    tok, lm, _ = load_tokenizer_and_model(str(model_dir), device="cpu", dtype="float32")
    return {
        "root": root,
        "data": data,
        "ds": load_dataset(data),
        "model": str(model_dir),
        "tok": tok,
        "lm": lm,
    }


def reference(env, rows, pooling):
    """One user at a time: the prompt text tokenised afresh, transformers' final hidden state."""
    out = []
    for row in rows:
        history, _ = user_sample(env["ds"], row)
        ids = env["tok"](build_prompt(history), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = env["lm"](input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        out.append(h.mean(0) if pooling == "mean" else h[-1])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_vectors_equal_batch1_reference(env, pooling, side):
    rows = list(range(7))
    samples = user_reps.encode_prompts(env["tok"], env["ds"], rows)
    b = collate(samples, env["tok"].pad_token_id, side)
    got = user_reps.embed(env["lm"], b["input_ids"], b["attention_mask"], pooling).numpy()
    ref = reference(env, rows, pooling)
    assert got.shape == (7, 32)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="pooling='max'"):
        user_reps.embed(env["lm"], b["input_ids"], b["attention_mask"], "max")


def _cfg(env, out, **kw):
    base = dict(
        data=str(env["data"]),
        out=str(out),
        model=env["model"],
        batch_size=3,
        shard_size=5,
        device="cpu",
        dtype="float32",
    )
    return UserRepsConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(env):
    out = env["root"] / "full" / "llm_reps.npy"
    assert user_reps.main(_cfg(env, out)) == 0
    return out


def test_main_writes_every_users_vector(env, full_run):
    ds = env["ds"]
    reps, manifest = load_scores(full_run, kind="llm_representation", dataset=ds.fingerprint())
    assert reps.dtype == np.float32 and reps.shape == (ds.n_users, 32)
    np.testing.assert_allclose(
        reps, reference(env, range(ds.n_users), "mean"), rtol=1e-4, atol=1e-5
    )
    assert manifest["shards"] == 3 and manifest["pooling"] == "mean"
    assert manifest["options"]["settings"]["dataset"] == ds.fingerprint()


def test_users_ranges_and_resume(env, full_run, monkeypatch, capsys):
    out = env["root"] / "split" / "llm_reps.npy"
    user_reps.main(_cfg(env, out, users="5:13"))
    assert not out.exists() and "8 of 13 rows done" in capsys.readouterr().out
    calls = []
    real = user_reps.embed_samples

    def counting(model, samples, **kw):
        calls.append(len(samples))
        return real(model, samples, **kw)

    monkeypatch.setattr(user_reps, "embed_samples", counting)
    user_reps.main(_cfg(env, out, resume=True))  # only rows 0..4 are left
    assert calls == [5]
    np.testing.assert_allclose(np.load(out), np.load(full_run), rtol=1e-6)


def test_shard_with_other_settings_is_rejected(env, full_run, tmp_path):
    import shutil

    shutil.copytree(full_run.parent / "llm_reps.npy.shards", tmp_path / "llm_reps.npy.shards")
    with pytest.raises(UserError, match="other settings \\(pooling\\)"):
        user_reps.main(_cfg(env, tmp_path / "llm_reps.npy", resume=True, pooling="last"))
    assert not (tmp_path / "llm_reps.npy").exists()


def test_cli_and_select_tfdcon_reads_the_file(env, full_run, tmp_path):
    out = tmp_path / "reps.npy"
    rc = cli(
        [
            "user-reps",
            "--data",
            str(env["data"]),
            "--out",
            str(out),
            "--model",
            env["model"],
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--pooling",
            "last",
        ]
    )
    assert rc == 0 and np.load(out).shape == (13, 32)
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    save_scores(
        run / "user_representations.npy",
        rng.normal(size=(13, 4)).astype(np.float32),
        kind="representation",
        dataset=env["ds"].fingerprint(),
    )
    sel = tmp_path / "sel.npy"
    rc = cli(
        [
            "select",
            "--method",
            "tfdcon",
            "--data",
            str(env["data"]),
            "--run",
            str(run),
            "--llm-reps",
            str(out),
            "--n",
            "4",
            "--clusters",
            "2",
            "--out",
            str(sel),
        ]
    )
    assert rc == 0
    _, manifest = load_scores(sel, kind="selection")
    assert manifest["inputs"]["llm_representations"]["path"] == str(out)
    assert manifest["inputs"]["llm_representations"]["kind"] == "llm_representation"


# ----------------------------------------------------------------------------- pipeline wiring
def test_pipeline_and_experiment_wire_llm_reps_for_tfdcon_only(tmp_path):
    from jaxrec.experiment import Cell, wire_cell
    from jaxrec.pipeline import PipelineConfig, uses_llm_reps, wire

    sections = {"select": {"method": "tfdcon"}, "finetune": {"model": "/llama"}}
    wired = wire(sections, tmp_path, "data")
    assert wired["user_reps"]["out"] == f"{tmp_path}/llm_reps.npy"
    assert wired["user_reps"]["model"] == "/llama"  # the BIGRec LLM
    pipe = PipelineConfig()
    assert uses_llm_reps(pipe, sections, "tfdcon")
    assert not uses_llm_reps(pipe, sections, "dealrec")
    assert not uses_llm_reps(PipelineConfig(tfdcon_llm_reps=False), sections, "tfdcon")
    assert not uses_llm_reps(pipe, {"select": {"llm_reps": "mine.npy"}}, "tfdcon")
    for method, on in (("tfdcon", True), ("random", False)):
        cell = Cell(method=method, seed=0, point=())
        _, w = wire_cell(wired, tmp_path, cell, uses_llm_reps(pipe, sections, method))
        assert w["select"].get("llm_reps") == (f"{tmp_path}/llm_reps.npy" if on else None)


def test_run_tfdcon_makes_and_uses_llm_reps(tmp_path):
    root = tmp_path
    data = make_synthetic(root / "data", n_users=40, n_items=30, n_clusters=3, max_len=8, seed=1)
    model = str(tiny_llama(root / "model"))
    llm = {"model": model, "device": "cpu", "dtype": "float32", "cutoff_len": 256}
    cfg = {
        "pipeline": {
            "workdir": str(root / "work"),
            "data": str(data),
            "stages": ["surrogate", "user_reps", "select"],
        },
        "surrogate": {"epochs": 1, "batch_size": 32},
        "user_reps": llm,
        "select": {"method": "tfdcon", "n": 6, "clusters": 3},
    }
    path = root / "tfdcon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["run", str(path)]) == 0
    work = Path(root / "work")
    reps, _ = load_scores(work / "llm_reps.npy", kind="llm_representation")
    assert reps.shape == (40, 32)
    _, manifest = load_scores(work / "selected.npy", kind="selection")
    assert manifest["method"] == "tfdcon"
    assert manifest["inputs"]["llm_representations"]["path"] == str(work / "llm_reps.npy")
    assert "representations" in manifest["inputs"]
