"""TIGER's T5, trie-constrained beam search, fine-tune and evaluation (small synthetic data,
random unique codes built here, tiny T5 configs where the size does not matter)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from llm_bridge.config import EvaluateConfig
from llm_bridge.tiger import finetune as tft
from llm_bridge.tiger import generate as gen
from llm_bridge.tiger import model as M
from llm_bridge.tiger.evaluate import run as evaluate_main
from tests.support import TINY, ft_config, random_codes, random_inputs, write_codes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- model
def test_vocabulary_and_samples(syn):
    _, _, ds, codes, sizes = syn
    tokens = M.item_tokens(codes, sizes)
    assert M.vocab_size(sizes) == 2 + sum(sizes)
    assert tokens[0].tolist() == [M.PAD] * 4
    assert tokens[1].tolist() == [
        2 + codes[0, 0],
        6 + codes[0, 1],
        10 + codes[0, 2],
        13 + codes[0, 3],
    ]
    assert M.history_input([], tokens, 20) == [M.EOS]
    assert M.history_input([3, 1, 2], tokens, 2) == tokens[[1, 2]].reshape(-1).tolist() + [M.EOS]
    inputs, targets, rows = M.user_samples(ds, range(ds.n_users), tokens, 20, "train")
    u = int(rows[5])
    assert inputs[5] == M.history_input(ds.train[u][:-1], tokens, 20)
    assert targets[5].tolist() == tokens[ds.train[u][-1]].tolist() + [M.EOS]
    _, vt, vrows = M.user_samples(ds, range(ds.n_users), tokens, 20, "valid")
    assert len(vrows) == sum(len(v) > 0 for v in ds.valid) and vt.shape == (len(vrows), 5)


def test_functional_forward_equals_module(syn):
    _, _, _, codes, sizes = syn
    model = M.build_model(sizes, 0, **TINY).eval()
    tokens = M.item_tokens(codes, sizes)
    inputs = random_inputs(6, len(codes), tokens, seed=2)
    ids, mask = M.pad_inputs(inputs)
    targets = torch.as_tensor(tokens[[1, 2, 3, 4, 5, 6]])
    targets = torch.cat([targets, torch.full((6, 1), M.EOS)], 1)
    p, spec = M.params_of(model), M.Spec.of(model.config)
    ours = M.sample_losses(p, spec, ids, mask, targets)
    with torch.no_grad():
        ref = torch.stack(
            [
                model(input_ids=ids[b : b + 1, : len(x)], labels=targets[b : b + 1]).loss
                for b, x in enumerate(inputs)
            ]
        )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_init_seed_decides_the_parameters():
    a, b, c = (M.build_model([4, 4], s, **TINY) for s in (0, 0, 1))
    assert torch.equal(a.shared.weight, b.shared.weight)
    assert not torch.equal(a.shared.weight, c.shared.weight)


def test_cpu_threads_follow_the_environment_and_are_restored(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(M.THREADS_ENV, raising=False)
    assert M.default_threads() == M.CPU_THREADS == 1
    monkeypatch.setenv(M.THREADS_ENV, "2")
    with M.cpu_threads("cpu"):
        assert torch.get_num_threads() == 2
    with M.cpu_threads("cpu", 1):  # an explicit count wins over the environment
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(M.THREADS_ENV, bad)
        with pytest.raises(UserError, match=M.THREADS_ENV):
            M.default_threads()


# ----------------------------------------------------------------------------- beam search
def test_trie_tables():
    codes = np.array([[0, 1], [0, 2], [2, 0]])
    trie = gen.build_trie(codes, [3, 3])
    assert trie.allowed[0].tolist() == [[True, False, True]]
    assert trie.allowed[1].tolist() == [[False, True, True], [True, False, False]]
    assert trie.child[1][0, 1] == 1 and trie.child[1][0, 2] == 2 and trie.child[1][1, 0] == 3


@pytest.mark.parametrize("cache", [True, False])
def test_beam_search_yields_real_distinct_items(cache):
    sizes = [6, 5, 4, 3]
    codes = random_codes(150, sizes, seed=4)
    model = M.build_model(sizes, 3, **TINY).eval()
    inputs = random_inputs(64, 150, M.item_tokens(codes, sizes), seed=5)
    items, scores = gen.generate(
        model, inputs, gen.build_trie(codes, sizes), beams=20, batch_size=16, cache=cache, desc=None
    )
    assert items.shape == (64, 20) and np.isfinite(scores).all()
    assert ((items >= 1) & (items <= 150)).all()
    assert all(len(set(row)) == 20 for row in items.tolist())
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_beam_with_cache_equals_recompute():
    sizes = [5, 5, 4, 3]
    codes = random_codes(120, sizes, seed=6)
    model = M.build_model(sizes, 1, **TINY).eval()
    inputs = random_inputs(20, 120, M.item_tokens(codes, sizes), seed=7)
    trie = gen.build_trie(codes, sizes)
    a = gen.generate(model, inputs, trie, beams=20, cache=True, desc=None)
    b = gen.generate(model, inputs, trie, beams=20, cache=False, desc=None)
    assert (a[0] == b[0]).all()
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)


def test_beam_ranking_equals_exhaustive_scoring():
    """With beams >= items the beam keeps every item: its order must be the order of each
    item's 4-code log-probability computed by the module, teacher-forced."""
    sizes = [4, 3, 3, 2]
    codes = random_codes(30, sizes, seed=8)
    tokens = M.item_tokens(codes, sizes)
    model = M.build_model(sizes, 2, **TINY).eval()
    inputs = random_inputs(5, 30, tokens, seed=9)
    items, scores = gen.generate(
        model, inputs, gen.build_trie(codes, sizes), beams=40, batch_size=2, desc=None
    )
    tok = torch.as_tensor(tokens[1:])
    dec = torch.cat([torch.zeros(30, 1, dtype=torch.long), tok[:, :-1]], 1)
    for u, x in enumerate(inputs):
        ids = torch.as_tensor([x] * 30)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, decoder_input_ids=dec).logits, -1)
        exact = logp.gather(2, tok[:, :, None]).sum((1, 2)).numpy()
        order = np.argsort(-exact, kind="stable") + 1
        assert items[u, :30].tolist() == order.tolist()
        np.testing.assert_allclose(scores[u, :30], exact[order - 1], rtol=1e-5, atol=1e-5)
        assert (items[u, 30:] == 0).all() and np.isneginf(scores[u, 30:]).all()


# ----------------------------------------------------------------------------- fine-tune
def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def finetuned(syn, tmp_path_factory):
    """An uninterrupted 4-epoch fine-tune (TIGER's sizes) on the synthetic selection."""
    root, path, *_ = syn
    out = tmp_path_factory.mktemp("ft") / "model"
    assert tft.run(ft_config(root, path, out)) == 0
    return out


def test_finetune_loss_falls_and_writes_the_contract(finetuned):
    record = json.loads((finetuned / "train_record.json").read_text())
    losses = [e["train_loss"] for e in record["epochs"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    assert record["finished"] and record["backend"] == "tiger" and record["n_train_samples"] == 48
    assert record["best_epoch"] == int(np.argmin([e["valid_loss"] for e in record["epochs"]])) + 1
    assert record["settings"]["semantic_ids"]["codebook_sizes"] == [4, 4, 3, 2]
    assert (finetuned / "model.safetensors").is_file() and (finetuned / "config.json").is_file()
    assert M.load_model(finetuned).config.d_model == 128


def test_resume_after_kill_equals_uninterrupted(syn, finetuned, tmp_path, monkeypatch):
    root, path, *_ = syn
    out = tmp_path / "model"
    real, calls = tft.train_epoch, []

    def dies_in_epoch_3(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-epoch, after epoch 2's checkpoint
        return real(*args, **kw)

    monkeypatch.setattr(tft, "train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        tft.run(ft_config(root, path, out))
    assert not (out / "train_record.json").exists()
    monkeypatch.setattr(tft, "train_epoch", real)
    torch.manual_seed(123)  # the global RNG state must come from the checkpoint
    assert tft.run(ft_config(root, path, out)) == 0
    a, b = _weights(finetuned), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((f / "train_record.json").read_text()) for f in (finetuned, out))
    assert [(e["train_loss"], e["valid_loss"]) for e in ra["epochs"]] == [
        (e["train_loss"], e["valid_loss"]) for e in rb["epochs"]
    ]


def test_finetune_other_settings_do_not_resume(syn, tmp_path):
    root, path, *_ = syn
    out = tmp_path / "model"
    assert tft.run(ft_config(root, path, out, epochs=1)) == 0
    with pytest.raises(UserError, match="other settings"):
        tft.run(ft_config(root, path, out, epochs=1, lr=1e-2))


def test_finetune_codes_of_another_dataset_fail_before_writing(syn, tmp_path):
    root, path, _ds, codes, sizes = syn
    other = load_dataset(make_synthetic(tmp_path / "other", n_users=50, n_items=40, seed=9))
    write_codes(tmp_path / "other_codes.npy", other, codes, sizes)
    out = tmp_path / "model"
    with pytest.raises(UserError) as err:
        tft.run(ft_config(root, path, out, semantic_ids=str(tmp_path / "other_codes.npy")))
    assert "\n" not in str(err.value) and not out.exists()


# ----------------------------------------------------------------------------- evaluate
def ev_config(root, path, adapter, out, **kw) -> EvaluateConfig:
    base = {
        "data": str(path),
        "backend": "tiger",
        "semantic_ids": str(root / "codes.npy"),
        "adapter": str(adapter),
        "out": str(out),
        "beams": 20,
        "batch_size": 8,
        "device": "cpu",
    }
    return EvaluateConfig(**{**base, **kw})


def test_evaluate_writes_metrics_and_predictions(syn, finetuned, tmp_path):
    root, path, ds, *_ = syn
    out = tmp_path / "metrics.json"
    assert evaluate_main(ev_config(root, path, finetuned, out)) == 0
    metrics = json.loads(out.read_text())
    n_test = sum(len(t) > 0 for t in ds.test)
    assert metrics["n_users"] == n_test
    for key in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        assert 0.0 <= metrics[key] <= 1.0
    lines = [json.loads(x) for x in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert len(lines) == n_test
    for line in lines:
        assert len(line["top"]) == 20 == len(set(line["top"]))
        assert line["truth"] == sorted(set(ds.test[line["row"]].tolist()))
        assert line["user_id"] == ds.user_ids[line["row"]]


def test_evaluate_with_other_codes_fails_in_one_line(syn, finetuned, tmp_path):
    root, path, ds, _codes, sizes = syn
    write_codes(tmp_path / "codes2.npy", ds, random_codes(ds.n_items, sizes, seed=99), sizes)
    out = tmp_path / "metrics.json"
    with pytest.raises(UserError, match="other semantic IDs") as err:
        evaluate_main(
            ev_config(root, path, finetuned, out, semantic_ids=str(tmp_path / "codes2.npy"))
        )
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a finished TIGER model folder"):
        evaluate_main(ev_config(root, path, tmp_path, out))
    with pytest.raises(UserError, match="20 beams"):
        evaluate_main(ev_config(root, path, finetuned, out, beams=4))
    assert not out.exists() and not out.with_suffix(".predictions.jsonl").exists()


# ----------------------------------------------------------------------------- damaged files
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage,names",
    [
        (lambda c: (c / "state.json").write_text('{"epoch": 4, "sett'), "state.json"),
        (lambda c: _truncate(next(c.glob("model-*.safetensors"))), "model-4.safetensors"),
        (lambda c: _truncate(next(c.glob("optimizer-*.pt"))), "optimizer-4.pt"),
        (lambda c: next(c.glob("optimizer-*.pt")).unlink(), "optimizer-4.pt: missing"),
    ],
    ids=["corrupt state", "truncated model", "truncated optimizer", "missing optimizer"],
)
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(
    syn, finetuned, tmp_path, damage, names
):
    import shutil

    root, path, *_ = syn
    out = tmp_path / "model"
    shutil.copytree(finetuned, out)
    damage(out / "checkpoint")
    with pytest.raises(UserError) as err:
        tft.run(ft_config(root, path, out))
    message = str(err.value)
    assert names in message and "--no-resume" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncated weights", "invalid config.json"])
def test_evaluate_a_damaged_model_folder_is_a_one_line_error(syn, finetuned, tmp_path, damage):
    import shutil

    root, path, *_ = syn
    model = tmp_path / "model"
    shutil.copytree(finetuned, model)
    if damage == "truncated weights":
        _truncate(model / "model.safetensors")
    else:
        (model / "config.json").write_text("{not json")
    out = tmp_path / "metrics.json"
    with pytest.raises(UserError) as err:
        evaluate_main(ev_config(root, path, model, out))
    message = str(err.value)
    assert str(model) in message and "damaged" in message and "\n" not in message
    assert not out.exists()
