"""``dealrec user-reps --backend tiger`` (TF-DCon's LLM half on TIGER's T5): the batched vectors
against a batch-1 loop over the ``transformers`` encoder on hand-made histories, the command
(at init and from a fine-tuned model folder), the pipeline's wiring, and a tiny TIGER
``dealrec run`` with ``tfdcon`` that makes the T5 vectors, selects on them, fine-tunes on the
selection and evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jaxrec.cli import main as cli
from jaxrec.data import load_dataset, load_scores
from jaxrec.data.dataset import sha256_file
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from jaxrec.pipeline import wire
from llm_bridge import user_reps as bigrec_user_reps
from llm_bridge.config import UserRepsConfig
from llm_bridge.tiger import model as M
from llm_bridge.tiger import user_reps as tr
from tests.support import TIGER_EVALUATE, TIGER_FINETUNE, TINY, random_codes, write_codes

SIZES = [3, 3, 2, 2]
# user -> train items, by hand: none, one, two, five, and 8 > MAX_HISTORY (the oldest cut)
TRAIN = [[], [4], [2, 7], [1, 3, 5, 7, 9], [10, 9, 8, 7, 6, 5, 4, 3]]
MAX_HISTORY = 4


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """A 5-user, 10-item dataset with the train sequences of :data:`TRAIN` and its codes."""
    root = tmp_path_factory.mktemp("tiger_reps")
    data = make_synthetic(root / "data", n_users=5, n_items=10, n_clusters=2, seed=0)
    for name, seqs in (("train", TRAIN), ("valid", [[], [5], [], [2], [1]])):
        rows = [" ".join(map(str, [u + 1, *s])) for u, s in enumerate(seqs)]
        (data / f"sequential_{name}.txt").write_text("\n".join(rows) + "\n")
    (data / "sequential_test.txt").write_text("".join(f"{u + 1} {u + 2}\n" for u in range(5)))
    ds = load_dataset(data)
    codes = random_codes(ds.n_items, SIZES, seed=2)
    write_codes(root / "codes.npy", ds, codes, SIZES)
    return root, data, ds, codes


def hand_tokens(codes, items) -> list[int]:
    """The encoder input worked out by hand: the codes of the last MAX_HISTORY items but the
    last train item, code ``c`` at position ``l`` as token ``2 + sum(SIZES[:l]) + c``, then EOS."""
    offsets = [2, 5, 8, 10]
    hist = items[:-1][-MAX_HISTORY:]
    return [offsets[level] + int(codes[i - 1, level]) for i in hist for level in range(4)] + [1]


def loop_reference(model, inputs, pooling="mean") -> np.ndarray:
    """One user at a time through the ``transformers`` encoder (no padding), pooled by hand."""
    out = []
    for x in inputs:
        with torch.no_grad():
            h = model.encoder(input_ids=torch.tensor([x])).last_hidden_state[0]
        out.append(h.mean(0) if pooling == "mean" else h[-1])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_batched_reps_equal_a_batch1_encoder_loop(hand, pooling):
    _, _, ds, codes = hand
    inputs = tr.user_inputs(ds, range(ds.n_users), M.item_tokens(codes, SIZES), MAX_HISTORY)
    assert inputs == [hand_tokens(codes, t) for t in TRAIN]  # the input, worked by hand
    assert inputs[0] == inputs[1] == [M.EOS] and len(inputs[4]) == 4 * MAX_HISTORY + 1
    model = M.build_model(SIZES, 3, "cpu", **TINY).eval()
    got = tr.embed_inputs(model, inputs, batch_size=3, pooling=pooling)  # mixed lengths, padded
    assert got.shape == (5, TINY["d_model"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, loop_reference(model, inputs, pooling), rtol=1e-5, atol=1e-5)
    assert np.abs(got[2] - got[3]).max() > 1e-3  # other histories, other vectors
    ids, mask = M.pad_inputs(inputs)
    with pytest.raises(UserError, match="pooling='max'"):
        tr.embed(M.params_of(model), M.Spec.of(model.config), ids, mask, "max")


def _cfg(hand, out, **kw) -> UserRepsConfig:
    root, data, _, _ = hand
    base = dict(
        data=str(data),
        backend="tiger",
        semantic_ids=str(root / "codes.npy"),
        out=str(out),
        max_history=MAX_HISTORY,
        init_seed=5,
        batch_size=2,
        shard_size=2,
        device="cpu",
    )
    return UserRepsConfig(**{**base, **kw})


def test_command_at_init_and_from_a_model_folder(hand, tmp_path, capsys):
    root, _, ds, codes = hand
    inputs = [hand_tokens(codes, t) for t in TRAIN]
    out = tmp_path / "reps.npy"
    assert bigrec_user_reps.main(_cfg(hand, out, users="2:4")) == 0  # a part: not merged yet
    assert not out.exists() and "2 of 5 rows done" in capsys.readouterr().out
    assert bigrec_user_reps.main(_cfg(hand, out)) == 0  # resumes the other rows
    reps, manifest = load_scores(out, kind="llm_representation", dataset=ds.fingerprint())
    init = M.build_model(SIZES, 5).eval()  # TIGER's sizes, init_seed 5
    np.testing.assert_allclose(reps, loop_reference(init, inputs), rtol=1e-5, atol=1e-5)
    assert manifest["backend"] == "tiger" and manifest["shards"] == 3
    assert manifest["options"]["settings"]["init_seed"] == 5
    # a fine-tuned model folder (as `dealrec finetune --backend tiger` leaves it)
    folder = tmp_path / "model"
    trained = M.build_model(SIZES, 9, **TINY)
    trained.save_pretrained(str(folder))
    settings = {"dataset": ds.fingerprint(), "semantic_ids": M.codes_digest(codes, SIZES)}
    record = {"backend": "tiger", "settings": settings, "config": {}}
    (folder / "train_record.json").write_text(json.dumps(record))
    out2 = tmp_path / "reps_trained.npy"
    argv = ["user-reps", "--backend", "tiger", "--semantic-ids", str(root / "codes.npy")]
    argv += ["--data", str(hand[1]), "--out", str(out2), "--model", str(folder)]
    argv += ["--pooling", "last", "--max-history", str(MAX_HISTORY), "--device", "cpu"]
    assert cli(argv) == 0
    reps2 = np.load(out2)
    ref = loop_reference(M.load_model(folder), inputs, "last")
    np.testing.assert_allclose(reps2, ref, rtol=1e-5, atol=1e-5)
    # shards of another model are refused; no semantic IDs is a one-line error
    with pytest.raises(UserError, match="other settings"):
        bigrec_user_reps.main(_cfg(hand, out2, pooling="last"))
    with pytest.raises(UserError, match="--semantic-ids"):
        bigrec_user_reps.main(_cfg(hand, tmp_path / "x.npy", semantic_ids=""))


def test_pipeline_wires_the_backend_into_user_reps(tmp_path):
    sections = {"select": {"method": "tfdcon"}}
    w = wire(sections, tmp_path, "data", "tiger")
    assert w["user_reps"]["backend"] == "tiger"
    assert w["user_reps"]["semantic_ids"] == f"{tmp_path}/semantic_ids.npy"
    assert w["user_reps"]["max_history"] == 20  # finetune's, so at its default: not keyed
    short = {"effort": {"max_history": 7}, "finetune": {"max_history": 7}}
    assert wire(short, tmp_path, "data", "tiger")["user_reps"]["max_history"] == 7
    kept = wire({**sections, "user_reps": {"backend": "bigrec"}}, tmp_path, "data", "tiger")
    assert kept["user_reps"]["backend"] == "bigrec" and "semantic_ids" not in kept["user_reps"]
    assert wire(sections, tmp_path, "data", "bigrec")["user_reps"]["backend"] == "bigrec"
    with pytest.raises(UserError, match="user_reps.backend: tiger needs pipeline.backend"):
        wire({"user_reps": {"backend": "tiger"}}, tmp_path, "data", "bigrec")


def test_tiger_run_with_tfdcon_end_to_end(tmp_path):
    """The T5 vectors, the tfdcon selection on them, then TIGER's fine-tune on exactly the
    selected users and its evaluation (the fine-tune / evaluate sections of the tiny TIGER
    pipeline tests)."""
    data = make_synthetic(tmp_path / "data", n_users=40, n_items=20, n_clusters=3, seed=4)
    ds = load_dataset(data)
    work = tmp_path / "work"
    sizes = [4, 4, 2]
    write_codes(work / "semantic_ids.npy", ds, random_codes(ds.n_items, sizes, seed=0), sizes)
    cfg = {
        "pipeline": {
            "workdir": str(work),
            "data": str(data),
            "backend": "tiger",
            # the semantic IDs are written above (no semantic_ids stage); no effort: tfdcon
            "stages": ["surrogate", "user_reps", "select", "finetune", "evaluate"],
        },
        "surrogate": {"epochs": 1, "batch_size": 32},
        "user_reps": {"batch_size": 32, "device": "cpu"},
        "select": {"method": "tfdcon", "n": 8, "clusters": 2},
        "finetune": dict(TIGER_FINETUNE),
        "evaluate": dict(TIGER_EVALUATE),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["run", str(path)]) == 0
    reps, manifest = load_scores(work / "llm_reps.npy", kind="llm_representation")
    assert reps.shape == (40, M.T5_SIZES["d_model"]) and manifest["backend"] == "tiger"
    selected, sel = load_scores(work / "selected.npy", kind="selection")
    assert sel["method"] == "tfdcon"
    assert sel["inputs"]["llm_representations"]["path"] == str(work / "llm_reps.npy")
    assert "representations" in sel["inputs"]  # and the surrogate's half
    state = json.loads(Path(work / "stages.json").read_text())
    assert list(state) == [
        "surrogate",
        "user_reps",
        "influence:representation",
        "select",
        "finetune",
        "evaluate",
    ]
    # the fine-tune trained on the tfdcon selection: its file, one sample per selected user
    # (train_samples: last) and the valid samples of those of them with a valid item
    rows = [int(r) for r in selected]
    assert len(set(rows)) == 8 and all(len(ds.train[r]) for r in rows)
    record = json.loads((work / "adapter" / "train_record.json").read_text())
    assert record["backend"] == "tiger" and record["finished"]
    assert record["settings"]["selection_sha256"] == sha256_file(work / "selected.npy")
    assert record["n_train_samples"] == 8
    assert record["n_valid_samples"] == sum(len(ds.valid[r]) > 0 for r in rows)
    assert 1 <= record["best_epoch"] <= len(record["epochs"]) <= TIGER_FINETUNE["epochs"]
    # the evaluation of that model: a seeded 16 of the users with test items
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["backend"] == "tiger" and metrics["adapter"] == str(work / "adapter")
    assert metrics["n_users"] == TIGER_EVALUATE["users"] == 16
    assert metrics["n_users_with_items"] == sum(len(t) > 0 for t in ds.test)
    for k in (10, 20):
        for name in ("recall", "ndcg"):
            assert 0.0 <= metrics[f"{name}@{k}"] <= 1.0  # and so finite
    predictions = Path(metrics["predictions"]).read_text().splitlines()
    assert len(predictions) == 16
