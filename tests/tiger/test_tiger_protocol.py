"""The few-shot protocol options of issue 25: ``finetune.train_samples`` (TIGER's prefix
samples, the authors' ``--subseq``) and ``finetune.valid_users`` (a fixed early-stopping set)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset, save_scores
from jaxrec.data.dataset import Dataset
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from jaxrec.pipeline import key_options
from llm_bridge.config import FinetuneConfig
from llm_bridge.training import fixed_valid_users, valid_rows
from llm_bridge.tiger import model as M
from llm_bridge.tiger.finetune import run as finetune_main

NEW_OPTIONS = ("train_samples", "valid_users", "valid_fixed_n", "valid_fixed_seed")


def hand_dataset() -> Dataset:
    """Four users over items 1..6: train ``[5]``, ``[3, 1, 2]``, ``[1, 2, 3, 4]``, ``[6, 4]``."""
    arr = [np.asarray(x, np.int64) for x in ([5], [3, 1, 2], [1, 2, 3, 4], [6, 4])]
    return Dataset(
        path=Path("hand"),
        user_ids=np.arange(1, 5),
        train=arr,
        valid=[np.asarray(v, np.int64) for v in ([6], [], [5], [])],
        test=[np.asarray([1], np.int64)] * 4,
        titles=[""] + [f"t{i}" for i in range(1, 7)],
        train_sha256="0" * 64,
    )


def transrec_subseq(train_dict: dict, max_his_len: int) -> list[dict]:
    """A transcription of the authors' ``SeqRecDataset._process_train_data`` with
    ``--subseq`` (Linxyhaha/TransRec 04cb471, ``baselines/TIGER/data.py`` 263-285; no prefix
    numbering, not llama): item ids instead of the joined index strings."""
    inter_data = []
    for uid in train_dict:
        items = train_dict[uid]
        if len(items) > 1:
            for i in range(1, len(items)):
                one_data = {"item": items[i]}
                history = items[:i]
                if max_his_len > 0:
                    history = history[-max_his_len:]
                one_data["inters"] = history
                inter_data.append(one_data)
    return inter_data


def test_prefix_samples_equal_a_hand_written_list():
    ds = hand_dataset()
    # one code level, item i -> code i - 1 -> token 2 + i - 1 = i + 1; EOS = 1
    tokens = M.item_tokens(np.arange(6)[:, None], [6])
    inputs, targets, rows = M.prefix_samples(ds, [3, 0, 2, 1], tokens, max_history=2)
    expected = [  # (row, input tokens, target tokens)
        (3, [7, 1], [5, 1]),  # [6] -> 4
        # row 0 has one train item: no sample
        (2, [2, 1], [3, 1]),  # [1] -> 2
        (2, [2, 3, 1], [4, 1]),  # [1, 2] -> 3
        (2, [3, 4, 1], [5, 1]),  # [1, 2, 3] cut to [2, 3] -> 4
        (1, [4, 1], [2, 1]),  # [3] -> 1
        (1, [4, 2, 1], [3, 1]),  # [3, 1] -> 2
    ]
    assert rows.tolist() == [r for r, _, _ in expected]
    assert inputs == [x for _, x, _ in expected]
    assert targets.tolist() == [t for _, _, t in expected]


def test_prefix_samples_equal_the_authors_code_on_long_histories(tmp_path):
    path = make_synthetic(tmp_path / "d", n_users=60, n_items=30, n_clusters=3, max_len=40, seed=5)
    ds = load_dataset(path)
    assert max(len(t) for t in ds.train) > 21  # the 20-item cut is exercised
    tokens = M.item_tokens(np.arange(ds.n_items)[:, None], [ds.n_items])
    rows = np.random.default_rng(0).permutation(ds.n_users)[:40]
    inputs, targets, kept = M.prefix_samples(ds, rows, tokens, max_history=20)
    ref = transrec_subseq({int(r): ds.train[r].tolist() for r in rows}, max_his_len=20)
    assert len(inputs) == len(ref) == sum(max(len(ds.train[r]) - 1, 0) for r in rows)
    assert [x[:-1] for x in inputs] == [[i + 1 for i in d["inters"]] for d in ref]
    assert targets[:, 0].tolist() == [d["item"] + 1 for d in ref]


def test_fixed_valid_users_are_one_set_for_every_selection_and_seed(tmp_path):
    path = make_synthetic(tmp_path / "d", n_users=300, n_items=40, n_clusters=4, max_len=8, seed=2)
    ds = load_dataset(path)
    has_valid = np.asarray([len(v) > 0 for v in ds.valid])
    assert 40 < has_valid.sum() < ds.n_users  # some users have no valid item
    sel_a = np.random.default_rng(1).choice(ds.n_users, 64, replace=False)
    sel_b = np.random.default_rng(2).choice(ds.n_users, 32, replace=False)
    fixed = dict(valid_users="fixed", valid_fixed_n=40, valid_fixed_seed=7)
    a = valid_rows(ds, sel_a, FinetuneConfig(seed=0, **fixed))
    b = valid_rows(ds, sel_b, FinetuneConfig(seed=5, init_seed=3, **fixed))
    assert a.tolist() == b.tolist()
    assert len(a) == len(set(a.tolist())) == 40 and has_valid[a].all()
    other = fixed_valid_users(ds, 40, seed=8)
    assert other.tolist() != a.tolist() and has_valid[other].all()
    # the default is the selection itself (the paper's few-shot code)
    assert valid_rows(ds, sel_a, FinetuneConfig()).tolist() == sel_a.tolist()
    with pytest.raises(UserError, match="valid_fixed_n"):
        fixed_valid_users(ds, int(has_valid.sum()) + 1, 0)


def test_new_options_stay_out_of_the_reuse_key_at_their_default():
    defaults = key_options("finetune", {})
    assert not set(NEW_OPTIONS) & set(defaults)
    keyed = key_options("finetune", {"train_samples": "prefixes", "valid_users": "fixed"})
    assert keyed["train_samples"] == "prefixes" and keyed["valid_users"] == "fixed"


def test_finetune_trains_on_prefixes_and_stops_on_the_fixed_set(tmp_path):
    path = make_synthetic(tmp_path / "d", n_users=80, n_items=30, n_clusters=3, max_len=8, seed=4)
    ds = load_dataset(path)
    codes = np.stack(np.unravel_index(np.arange(ds.n_items), [4, 8]), 1).astype(np.int64)
    save_scores(
        tmp_path / "codes.npy",
        codes,
        kind="semantic_ids",
        dataset=ds.fingerprint(),
        codebook_sizes=[4, 8],
    )
    sel = np.arange(0, 80, 5)
    save_scores(tmp_path / "sel.npy", sel, kind="selection", dataset=ds.fingerprint())
    base = dict(
        data=str(path),
        backend="tiger",
        semantic_ids=str(tmp_path / "codes.npy"),
        selection=str(tmp_path / "sel.npy"),
        epochs=1,
        batch_size=64,
        grad_accum=1,
        device="cpu",
    )
    torch.set_num_threads(1)
    cfg = FinetuneConfig(
        out=str(tmp_path / "m"),
        train_samples="prefixes",
        valid_users="fixed",
        valid_fixed_n=10,
        **base,
    )
    assert finetune_main(cfg) == 0
    record = json.loads((tmp_path / "m" / "train_record.json").read_text())
    assert record["n_train_samples"] == sum(max(len(ds.train[r]) - 1, 0) for r in sel)
    assert record["n_valid_samples"] == 10 and record["early_stopping"]
    assert record["settings"]["train_samples"] == "prefixes"
    # the defaults leave the checkpoint settings as before (old checkpoints still resume)
    assert finetune_main(FinetuneConfig(out=str(tmp_path / "d0"), **base)) == 0
    record = json.loads((tmp_path / "d0" / "train_record.json").read_text())
    assert not set(NEW_OPTIONS) & set(record["settings"])
    assert record["n_train_samples"] == len(sel)
    assert record["n_valid_samples"] == sum(len(ds.valid[r]) > 0 for r in sel)


def test_bigrec_stops_on_the_fixed_set_and_refuses_prefixes(tmp_path):
    """BIGRec shares ``valid_users``: a selection without any valid item still early-stops
    on the fixed set; ``train_samples: prefixes`` is TIGER's only."""
    from llm_bridge import finetune
    from tests.support import tiny_llama

    path = make_synthetic(tmp_path / "d", n_users=60, n_items=30, n_clusters=3, max_len=6, seed=1)
    ds = load_dataset(path)
    rows = np.asarray([r for r in range(ds.n_users) if len(ds.valid[r]) == 0][:6])
    sel = save_scores(tmp_path / "sel.npy", rows, kind="selection", dataset=ds.fingerprint())
    base = dict(
        data=str(path),
        selection=str(sel),
        model=str(tiny_llama(tmp_path / "model")),
        batch_size=4,
        grad_accum=1,
        epochs=1,
        cutoff_len=256,
        device="cpu",
        dtype="float32",
    )
    cfg = FinetuneConfig(out=str(tmp_path / "a"), valid_users="fixed", valid_fixed_n=5, **base)
    assert finetune.main(cfg) == 0
    record = json.loads((tmp_path / "a" / "train_record.json").read_text())
    assert record["early_stopping"] and record["n_valid_samples"] == 5
    assert record["settings"]["valid_users"] == "fixed"
    with pytest.raises(UserError, match="tiger only"):
        finetune.main(FinetuneConfig(out=str(tmp_path / "b"), train_samples="prefixes", **base))
    assert not (tmp_path / "b").exists()
