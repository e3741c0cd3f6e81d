"""Effort scores (paper Eq. 12): batched per-sample norms against a batch-1 autograd loop, and
the sharded, resumable ``dealrec effort`` on a tiny random LLaMA (no download)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset, load_scores, save_scores
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from llm_bridge import bigrec, effort, shards
from llm_bridge.config import EffortConfig
from llm_bridge.model import add_lora, load_tokenizer_and_model
from llm_bridge.prompts import collate, encode_sample, user_sample
from tests.support import tiny_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("effort")
    data = make_synthetic(
        root / "data", n_users=23, n_items=30, n_clusters=3, min_len=1, max_len=8, seed=2
    )
    model_dir = tiny_llama(root / "model")
    tok, lm, _ = load_tokenizer_and_model(str(model_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)
    lm = add_lora(lm)
    lm.eval()
    return {
        "root": root,
        "data": data,
        "ds": load_dataset(data),
        "model": str(model_dir),
        "tok": tok,
        "lm": lm,
    }


def reference_norms(model, samples, params) -> torch.Tensor:
    """The independent reference: one sample at a time, transformers' own loss, autograd."""
    out = []
    for s in samples:
        loss = model(
            input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])
        ).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))
    return torch.stack(out)


def _samples(env, rows, train_on_inputs=None):
    ds, tok = env["ds"], env["tok"]
    out = []
    for i, row in enumerate(rows):
        hist, target = user_sample(ds, int(row))
        toi = (i % 2 == 1) if train_on_inputs is None else train_on_inputs
        out.append(encode_sample(tok, hist, target, train_on_inputs=toi))
    return out


def _randomise_lora_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    saved = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                saved[n] = p.clone()
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return saved


def _restore(model, saved):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batched_norms_equal_batch1_loop(env, side, batch):
    model = env["lm"]
    saved = _randomise_lora_b(model)  # nonzero lora_B: lora_A gradients are nonzero too
    try:
        samples = _samples(env, range(batch))
        params = [p for p in model.parameters() if p.requires_grad]
        ref = reference_norms(model, samples, params)
        b = collate(samples, env["tok"].pad_token_id, side)
        got = effort.per_sample_grad_norms(model, b["input_ids"], b["attention_mask"], b["labels"])
        assert got.shape == (batch,) and torch.all(ref > 1e-3)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
        assert all(p.grad is None for p in model.parameters())  # nothing accumulated
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            n for n, p in model.named_parameters() if "lora_" in n
        ]
    finally:
        _restore(model, saved)


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_budget_splits_a_batch_without_changing_norms(env, side):
    """per_sample_grad_norms cuts a big padded batch into passes of at most max_tokens padded
    tokens itself (each pass with its own padding stripped); the norms stay the loop's."""
    model = env["lm"]
    saved = _randomise_lora_b(model)
    try:
        samples = _samples(env, range(9))
        params = [p for p in model.parameters() if p.requires_grad]
        ref = reference_norms(model, samples, params)
        b = collate(samples, env["tok"].pad_token_id, side)
        longest = int(b["attention_mask"].sum(-1).max())
        for budget in (0, longest, 2 * longest + 1, 10_000):
            got = effort.per_sample_grad_norms(
                model, b["input_ids"], b["attention_mask"], b["labels"], max_tokens=budget
            )
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
        with pytest.raises(ValueError, match="autocast='fp8'"):
            effort.per_sample_grad_norms(
                model, b["input_ids"], b["attention_mask"], b["labels"], autocast="fp8"
            )
    finally:
        _restore(model, saved)


def test_fresh_lora_only_lora_b_has_gradient(env):
    model = env["lm"]
    samples = _samples(env, range(4), train_on_inputs=False)
    b = collate(samples, env["tok"].pad_token_id)
    all_ = effort.per_sample_grad_norms(model, b["input_ids"], b["attention_mask"], b["labels"])
    only_b = effort.per_sample_grad_norms(
        model, b["input_ids"], b["attention_mask"], b["labels"], params=r"lora_B"
    )
    only_a = effort.per_sample_grad_norms(
        model, b["input_ids"], b["attention_mask"], b["labels"], params=r"lora_A"
    )
    torch.testing.assert_close(all_, only_b, rtol=1e-6, atol=0)
    assert float(only_a.abs().max()) == 0.0 and float(all_.min()) > 0
    ref = reference_norms(model, samples, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(all_, ref, rtol=1e-4, atol=0)


def test_params_regex_including_non_linear_parameters(env):
    """A regex picks any parameters: a last-layer LoRA factor (the paper's code) and, through
    the exact fallback, RMSNorm weights that are not part of an nn.Linear."""
    model = env["lm"]
    saved = _randomise_lora_b(model)
    try:
        samples = _samples(env, range(5))
        b = collate(samples, env["tok"].pad_token_id, "left")
        named = dict(model.named_parameters())
        for regex in (r"layers\.1\.self_attn\.v_proj\.lora_B", r"lora_B|post_attention_layernorm"):
            chosen = [p for n, p in named.items() if re.search(regex, n)]
            flags = {n: p.requires_grad for n, p in named.items()}
            for p in chosen:
                p.requires_grad_(True)
            ref = reference_norms(model, samples, chosen)
            for n, p in named.items():
                p.requires_grad_(flags[n])
            got = effort.per_sample_grad_norms(
                model, b["input_ids"], b["attention_mask"], b["labels"], params=regex
            )
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
            assert {n for n, p in named.items() if p.requires_grad} == {
                n for n, f in flags.items() if f
            }
        with pytest.raises(UserError, match="no parameter matches"):
            effort.per_sample_grad_norms(
                model, b["input_ids"], b["attention_mask"], b["labels"], params="nothing_like_this"
            )
    finally:
        _restore(model, saved)


def test_sample_without_labels_scores_zero(env):
    s = _samples(env, [0, 1], train_on_inputs=False)
    s[1] = {**s[1], "labels": [-100] * len(s[1]["labels"])}
    b = collate(s, env["tok"].pad_token_id)
    got = effort.per_sample_grad_norms(env["lm"], b["input_ids"], b["attention_mask"], b["labels"])
    assert float(got[0]) > 0 and float(got[1]) == 0.0


def test_shard_ranges_and_users():
    assert shards.shard_ranges(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shards.shard_ranges(3, 10, 4) == [(3, 4), (4, 8), (8, 10)]
    assert shards.parse_users("", 9) == (0, 9) and shards.parse_users("2:", 9) == (2, 9)
    for bad in ("5:2", "a:b", "0:10", "3"):
        with pytest.raises(UserError):
            shards.parse_users(bad, 9)


# ----------------------------------------------------------------------------- dealrec effort
def _cfg(env, out, **kw):
    base = dict(
        data=str(env["data"]),
        out=str(out),
        model=env["model"],
        batch_size=4,
        shard_size=5,
        device="cpu",
        dtype="float32",
        seed=0,
    )
    return EffortConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(env):
    out = env["root"] / "full" / "effort.npy"
    assert effort.main(_cfg(env, out)) == 0
    return out


def test_main_scores_every_user_like_the_loop(env, full_run):
    ds = env["ds"]
    scores, manifest = load_scores(full_run, kind="effort", dataset=ds.fingerprint())
    assert scores.dtype == np.float32 and scores.shape == (ds.n_users,)
    # independent reference: the fresh LoRA of the same seed, scored one user at a time
    _, lm, _ = load_tokenizer_and_model(env["model"], device="cpu", dtype="float32")
    torch.manual_seed(0)
    lm = add_lora(lm)
    lm.eval()
    ref = reference_norms(
        lm,
        _samples(env, range(ds.n_users), train_on_inputs=False),
        [p for p in lm.parameters() if p.requires_grad],
    )
    np.testing.assert_allclose(scores, ref.numpy(), rtol=1e-4)
    assert manifest["kind"] == "effort" and manifest["shards"] == 5
    assert manifest["options"]["params"] == "" and manifest["loss"].startswith("response-mean")
    assert manifest["options"]["model_info"]["model_type"] == "llama"
    assert manifest["options"]["settings"]["dataset"] == ds.fingerprint()
    assert manifest["seconds"] > 0
    shards = sorted((full_run.parent / "effort.npy.shards").glob("rows-*.npy"))
    assert [p.name for p in shards][0] == "rows-00000000-00000005.npy" and len(shards) == 5


def test_resume_after_kill_scores_each_sample_once(env, full_run, monkeypatch):
    out = env["root"] / "resume" / "effort.npy"
    calls, kill_done = [], []
    real = effort.score_samples

    class Killed(BaseException):
        pass

    def counting(model, samples, **kw):
        calls.append(len(samples))
        if len(calls) == 3 and not kill_done:
            kill_done.append(True)
            raise Killed  # killed while scoring the third shard
        return real(model, samples, **kw)

    monkeypatch.setattr(bigrec, "score_samples", counting)  # the command scores through it
    with pytest.raises(Killed):
        effort.main(_cfg(env, out))
    assert not out.exists()
    assert len(list((out.parent / "effort.npy.shards").glob("rows-*.json"))) == 2
    calls.clear()
    effort.main(_cfg(env, out, resume=True, batch_size=3))
    assert sum(calls) == env["ds"].n_users - 10  # the 10 rows already done: not again
    np.testing.assert_allclose(np.load(out), np.load(full_run), rtol=1e-5)


def test_users_ranges_merge_when_complete(env, full_run, capsys):
    out = env["root"] / "split" / "effort.npy"
    effort.main(_cfg(env, out, users="7:23"))
    assert not out.exists() and "16 of 23 rows scored" in capsys.readouterr().out
    effort.main(_cfg(env, out, users="0:7"))
    np.testing.assert_allclose(np.load(out), np.load(full_run), rtol=1e-5)


def test_shard_from_another_dataset_is_rejected(env, full_run, tmp_path):
    out = tmp_path / "effort.npy"
    folder = tmp_path / "effort.npy.shards"
    save_scores(
        folder / "rows-00000000-00000005.npy",
        np.ones(5),
        kind=shards.EFFORT_SHARD,
        dataset={"train_sha256": "0" * 64, "n_users": 23},
        rows=[0, 5],
        settings={},
    )
    before = (folder / "rows-00000000-00000005.npy").read_bytes()
    with pytest.raises(UserError, match="another dataset") as e:
        effort.main(_cfg(env, out, resume=True))
    assert "\n" not in str(e.value) and not out.exists()
    assert (folder / "rows-00000000-00000005.npy").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [
        "rows-00000000-00000005.json",
        "rows-00000000-00000005.npy",
    ]


def test_shard_with_other_settings_is_rejected(env, full_run, tmp_path):
    import shutil

    shutil.copytree(full_run.parent / "effort.npy.shards", tmp_path / "effort.npy.shards")
    with pytest.raises(UserError, match="other settings \\(loss\\)"):
        effort.main(_cfg(env, tmp_path / "effort.npy", resume=True, loss="sequence-mean"))
    assert not (tmp_path / "effort.npy").exists()


def test_cli_bad_model_one_line_exit_2(env, tmp_path, capsys):
    from transformers import GPT2Config

    from jaxrec.cli import main as cli

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "effort.npy"
    rc = cli(
        [
            "effort",
            "--data",
            str(env["data"]),
            "--out",
            str(out),
            "--model",
            str(tmp_path / "gpt2"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not LLaMA-family" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "effort.npy.shards").exists()


def test_manifest_is_json_and_merge_refuses_gaps(env, full_run, tmp_path):
    manifest = json.loads(full_run.with_suffix(".json").read_text())
    assert manifest["dataset"]["n_users"] == env["ds"].n_users
    folder = tmp_path / "x.npy.shards"
    save_scores(
        folder / "rows-00000000-00000005.npy",
        np.ones(5),
        kind=shards.EFFORT_SHARD,
        dataset=env["ds"].fingerprint(),
        rows=[0, 5],
        settings={},
    )
    assert (
        shards.merge_shards(
            folder, tmp_path / "x.npy", env["ds"], shard_kind=shards.EFFORT_SHARD, kind="effort"
        )
        is None
    )
    assert not (tmp_path / "x.npy").exists()


def test_length_batches():
    lengths = [5, 100, 7, 6, 50, 8, 9]
    batches = shards.length_batches(lengths, batch_size=3, max_tokens=120)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))  # every sample once
    assert [lengths[i] for i in flat] == sorted(lengths)  # sorted by length
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 120)
    assert [len(b) for b in shards.length_batches(lengths, 3)] == [3, 3, 1]
