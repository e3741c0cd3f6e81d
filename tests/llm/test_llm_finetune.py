"""``dealrec finetune`` on a tiny random LLaMA and synthetic data: the loss goes down, the saved
adapter loads and reproduces it, early stopping keeps the best epoch, a killed run resumes to
the same result, and bad selections are refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset, save_scores
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from jaxrec.pipeline import stage_output
from llm_bridge import finetune, prompts
from llm_bridge.config import FinetuneConfig
from tests.support import tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = make_synthetic(root / "data", n_users=60, n_items=30, n_clusters=3, max_len=6, seed=1)
    ds = load_dataset(data)
    model_dir = tiny_llama(root / "model")
    rows = np.arange(0, 60, 3)  # 20 users
    sel = save_scores(root / "selected.npy", rows, kind="selection", dataset=ds.fingerprint())
    return {
        "root": root,
        "data": data,
        "ds": ds,
        "model": str(model_dir),
        "rows": rows,
        "selection": str(sel),
    }


def _cfg(setup, out, **kw):
    base = dict(
        data=str(setup["data"]),
        selection=setup["selection"],
        out=str(out),
        model=setup["model"],
        lr=3e-3,
        batch_size=4,
        grad_accum=2,
        epochs=3,
        patience=5,
        cutoff_len=256,
        device="cpu",
        dtype="float32",
        seed=0,
    )
    base.update(kw)
    return FinetuneConfig(**base)


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _train_loss(setup, adapter: str = ""):
    """Eval-mode loss of the selected users' training samples, with a freshly loaded model."""
    from llm_bridge.model import add_lora, load_tokenizer_and_model

    tok, model, _ = load_tokenizer_and_model(setup["model"], device="cpu", dtype="float32")
    if adapter:
        model = add_lora(model, adapter=adapter, trainable=False)
    samples = prompts.encode_users(
        tok, setup["ds"], setup["rows"], cutoff_len=256, train_on_inputs=False
    )
    return finetune.dataset_loss(model, samples, pad_id=tok.pad_token_id or 0)


def test_finetune_reduces_loss_and_saves_loadable_adapter(setup):
    out = setup["root"] / "run1"
    assert finetune.main(_cfg(setup, out)) == 0
    record = json.loads((out / "train_record.json").read_text())
    assert record["finished"] and record["n_train_samples"] == len(setup["rows"])
    n_valid = sum(len(setup["ds"].valid[r]) > 0 for r in setup["rows"])
    assert record["n_valid_samples"] == n_valid > 0 and record["early_stopping"]
    epochs = record["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(e["optimizer_steps"] == 3 for e in epochs)  # ceil(20/4)=5 micro, accum 2
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    valid = [e["valid_loss"] for e in epochs]
    assert record["best_epoch"] == 1 + int(np.argmin(valid))
    assert record["best_valid_loss"] == pytest.approx(min(valid))
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(out.glob(".best-*"))

    base = _train_loss(setup)
    tuned = _train_loss(setup, adapter=str(out))
    assert tuned < base - 0.05, (base, tuned)
    # the saved adapter is the best epoch's: its valid loss reproduces the record
    from llm_bridge.model import add_lora, load_tokenizer_and_model

    tok, model, _ = load_tokenizer_and_model(setup["model"], device="cpu", dtype="float32")
    model = add_lora(model, adapter=str(out), trainable=False)
    valid_samples = prompts.encode_users(
        tok, setup["ds"], setup["rows"], cutoff_len=256, train_on_inputs=False, split="valid"
    )
    assert finetune.dataset_loss(
        model, valid_samples, pad_id=tok.pad_token_id or 0
    ) == pytest.approx(record["best_valid_loss"], rel=1e-5)


def test_killed_run_resumes_to_the_same_adapter(setup, monkeypatch):
    ref = setup["root"] / "ref"
    finetune.main(_cfg(setup, ref, epochs=3))
    out = setup["root"] / "killed"
    real = finetune._save_checkpoint

    def save_then_die(ckpt, epoch, *a, **kw):
        real(ckpt, epoch, *a, **kw)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(_cfg(setup, out, epochs=3))
    monkeypatch.setattr(finetune, "_save_checkpoint", real)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epoch"] == 2
    # a killed run must not look finished to the pipeline (train_record.json = done)
    assert not (out / "train_record.json").exists()
    assert not stage_output("finetune", {"out": str(out)}).exists()
    finetune.main(_cfg(setup, out, epochs=3))
    a, b = (
        json.loads((ref / "train_record.json").read_text()),
        json.loads((out / "train_record.json").read_text()),
    )
    assert [e["epoch"] for e in b["epochs"]] == [1, 2, 3]
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-6, abs=1e-7)
        assert eb["valid_loss"] == pytest.approx(ea["valid_loss"], rel=1e-6, abs=1e-7)
    ta, tb = _adapter_tensors(ref), _adapter_tensors(out)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-6, atol=1e-7)
    # the checkpoint holds only the last epoch's files
    names = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert names == ["adapter-3.safetensors", "optimizer-3.pt", "state.json"]
    # other settings: refused, nothing changed
    with pytest.raises(UserError, match="other settings"):
        finetune.main(_cfg(setup, out, epochs=3, lr=1e-3))


def test_early_stopping_keeps_the_best_epoch(setup, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0, 0.5])  # best at 2, then 2 worse epochs
    monkeypatch.setattr(finetune, "dataset_loss", lambda *a, **kw: next(scripted))
    saved = []
    real = finetune.save_best
    monkeypatch.setattr(
        finetune, "save_best", lambda model, out: (saved.append(len(saved)), real(model, out))
    )
    out = setup["root"] / "early"
    finetune.main(_cfg(setup, out, epochs=6, patience=2))
    record = json.loads((out / "train_record.json").read_text())
    assert [e["valid_loss"] for e in record["epochs"]] == [3.0, 2.0, 2.5, 2.6]
    assert record["best_epoch"] == 2 and record["best_valid_loss"] == 2.0
    assert record["stopped_early"] and len(saved) == 2  # adapter written at epochs 1, 2 only


def test_no_valid_users_trains_fixed_epochs(setup, capsys):
    ds = setup["ds"]
    rows = np.asarray([r for r in range(ds.n_users) if len(ds.valid[r]) == 0][:6])
    sel = save_scores(
        setup["root"] / "novalid.npy", rows, kind="selection", dataset=ds.fingerprint()
    )
    out = setup["root"] / "novalid"
    finetune.main(_cfg(setup, out, selection=str(sel), epochs=10, fallback_epochs=2, patience=1))
    record = json.loads((out / "train_record.json").read_text())
    assert not record["early_stopping"] and record["max_epochs"] == 2
    assert [e["valid_loss"] for e in record["epochs"]] == [None, None]
    assert record["best_epoch"] == 2
    assert "no early stopping" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rows, message",
    [
        ([0, 5, 60], "out of range"),
        ([0, 5, -1], "out of range"),
        ([3, 4, 3], "duplicates"),
        ([], "empty"),
    ],
)
def test_bad_selection_is_refused_before_writing(setup, rows, message):
    ds = setup["ds"]
    sel = save_scores(
        setup["root"] / "bad.npy",
        np.asarray(rows, dtype=np.int64),
        kind="selection",
        dataset=ds.fingerprint(),
    )
    out = setup["root"] / "never"
    with pytest.raises(UserError, match=message):
        finetune.main(_cfg(setup, out, selection=str(sel)))
    assert not out.exists()


def test_cli_one_line_error_exit_2(setup, capsys):
    from jaxrec.cli import main as cli

    ds = setup["ds"]
    save_scores(
        setup["root"] / "infl.npy", np.zeros(ds.n_users), kind="influence", dataset=ds.fingerprint()
    )
    out = setup["root"] / "never2"
    code = cli(
        [
            "finetune",
            "--data",
            str(setup["data"]),
            "--selection",
            str(setup["root"] / "infl.npy"),
            "--out",
            str(out),
            "--model",
            setup["model"],
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "kind is 'influence'" in err
    assert not out.exists()
    code = cli(
        [
            "finetune",
            "--data",
            str(setup["data"]),
            "--selection",
            setup["selection"],
            "--out",
            str(out),
            "--model",
            setup["model"],
            "--adapter",
            str(setup["root"] / "missing"),
        ]
    )
    assert code == 2 and not out.exists()
