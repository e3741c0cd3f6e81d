"""``dealrec evaluate``: metric math against a hand-worked example, BIGRec grounding (ties,
duplicate titles, base-model embeddings independent of batching and of the adapter), and an
end-to-end run on a tiny random LLaMA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jaxrec.data import load_dataset
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from llm_bridge import evaluate
from llm_bridge.config import EvaluateConfig
from tests.support import GAMES, games_available, tiny_llama


# ----------------------------------------------------------------------------- pure functions
def test_rank_metrics_hand_worked():
    # user A: truth {1, 3, 4}; ranking 3 (hit), 7, 1 (hit), 8
    # user B: truth {8};       ranking 2, 4, 6, 8 (hit at rank 4)
    got = evaluate.rank_metrics([[3, 7, 1, 8], [2, 4, 6, 8]], [{1, 3, 4}, {8}], ks=(2, 4))
    l3 = math.log2(3)
    ndcg_a2 = 1 / (1 + 1 / l3)  # 1 hit at rank 1; ideal: 2 hits
    ndcg_a4 = (1 + 1 / 2) / (1 + 1 / l3 + 1 / 2)  # hits at 1, 3; ideal: 3 hits
    ndcg_b4 = (1 / math.log2(5)) / 1  # hit at 4; ideal: 1 hit
    assert got["recall@2"] == pytest.approx((1 / 3 + 0) / 2)
    assert got["ndcg@2"] == pytest.approx((ndcg_a2 + 0) / 2)
    assert got["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["ndcg@4"] == pytest.approx((ndcg_a4 + ndcg_b4) / 2)
    assert got["ndcg@4"] == pytest.approx((0.703918 + 0.430677) / 2, abs=1e-6)
    perfect = evaluate.rank_metrics([[5, 6, 1]], [{6, 5}], ks=(2,))
    assert perfect == {"recall@2": 1.0, "ndcg@2": 1.0}


def test_rank_items_ties_and_duplicates():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 5))
    emb[[4, 7, 9]] = emb[1]  # items 2, 5, 8, 10 share one embedding (one title)
    query = emb[1] + 1e-3
    ranked = evaluate.rank_items(query[None], emb, 12)[0]
    assert list(ranked[:4]) == [2, 5, 8, 10]  # all of them, adjacent, by id
    dist = np.linalg.norm(emb - query, axis=1)
    assert list(ranked) == list(np.lexsort((np.arange(12), dist)) + 1)
    # a K boundary that cuts the tie keeps the smallest ids, never a later item
    assert list(evaluate.rank_items(query[None], emb, 3)[0]) == [2, 5, 8]
    many = rng.normal(size=(7, 5))
    top = evaluate.rank_items(many, emb, 5)
    full = [list(np.argsort(np.linalg.norm(emb - q, axis=1), kind="stable")[:5] + 1) for q in many]
    assert top.tolist() == full


# ----------------------------------------------------------------------------- tiny LLaMA
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from llm_bridge.model import load_tokenizer_and_model

    root = tmp_path_factory.mktemp("ev")
    data = make_synthetic(root / "data", n_users=40, n_items=24, n_clusters=3, max_len=5, seed=2)
    items = [json.loads(x) for x in (data / "items.jsonl").read_text().splitlines()]
    items[6]["title"] = items[2]["title"]  # items 3 and 7 share a title
    (data / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    model_dir = tiny_llama(root / "model")
    tok, model, _ = load_tokenizer_and_model(str(model_dir), device="cpu", dtype="float32")
    return {
        "root": root,
        "data": data,
        "ds": load_dataset(data),
        "model": str(model_dir),
        "tok": tok,
        "lm": model,
    }


def _reference_embedding(model, tok, text):
    """Unbatched, unpadded forward: last layer's hidden state at the last token."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()


def test_embed_texts_matches_unbatched_reference(env):
    texts = ["Game 3 of series A0", "x", "Game 3 of series A0", "a much longer title, with words"]
    got1 = evaluate.embed_texts(env["lm"], env["tok"], texts, batch_size=1)
    got4 = evaluate.embed_texts(env["lm"], env["tok"], texts, batch_size=4)
    ref = np.stack([_reference_embedding(env["lm"], env["tok"], t) for t in texts])
    np.testing.assert_allclose(got1, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got4, ref, rtol=1e-4, atol=1e-5)
    assert np.array_equal(got4[0], got4[2])


def test_title_embeddings_cached_and_duplicates_equal(env):
    ds = env["ds"]
    cache = env["root"] / "cache"
    emb, info = evaluate.title_embeddings(
        env["lm"], env["tok"], ds.titles, model_path=env["model"], cache_dir=cache
    )
    assert not info["cached"] and emb.shape == (ds.n_items, env["lm"].config.hidden_size)
    assert np.array_equal(emb[2], emb[6])  # items 3 and 7: same title
    again, info2 = evaluate.title_embeddings(
        env["lm"], env["tok"], ds.titles, model_path=env["model"], cache_dir=cache
    )
    assert info2["cached"] and np.array_equal(again, emb)
    other = list(ds.titles)
    other[1] = "renamed"
    _, info3 = evaluate.title_embeddings(
        env["lm"], env["tok"], other, model_path=env["model"], cache_dir=cache
    )
    assert not info3["cached"]  # another title list, another cache file
    # duplicate titles keep their own ids, adjacent in the ranking
    ranked = evaluate.rank_items(emb[2][None], emb, 3)[0]
    assert list(ranked[:2]) == [3, 7]


@pytest.fixture(scope="module")
def adapter(env):
    """A LoRA adapter with non-zero B, so "adapter on" and "adapter off" differ."""
    from llm_bridge.model import add_lora, load_tokenizer_and_model

    _, model, _ = load_tokenizer_and_model(env["model"], device="cpu", dtype="float32")
    model = add_lora(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = env["root"] / "adapter"
    model.save_pretrained(str(path))
    return str(path)


def test_evaluate_end_to_end(env, adapter):
    ds = env["ds"]
    out = env["root"] / "run" / "metrics.json"
    cfg = EvaluateConfig(
        data=str(env["data"]),
        adapter=adapter,
        model=env["model"],
        split="test",
        users=6,
        beams=2,
        max_new_tokens=8,
        batch_size=4,
        out=str(out),
        cache_dir=str(env["root"] / "cache2"),
        device="cpu",
        dtype="float32",
        seed=0,
    )
    assert evaluate.main(cfg) == 0
    m = json.loads(out.read_text())
    for key in (
        "recall@10",
        "ndcg@10",
        "recall@20",
        "ndcg@20",
        "n_users",
        "seconds",
        "seconds_per_100_users",
        "split",
    ):
        assert key in m
    n_test = sum(len(t) > 0 for t in ds.test)
    assert m["n_users"] == 6 and m["n_users_with_items"] == n_test and m["subsample"]
    preds = [json.loads(x) for x in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6
    assert [p["row"] for p in preds] == list(evaluate.eval_users(ds, "test", 6, 0))
    # grounding is by the BASE model: recompute the ranking from an adapter-free model
    emb = np.stack([_reference_embedding(env["lm"], env["tok"], t) for t in ds.titles[1:]])
    for p in preds:
        assert set(p["truth"]) == set(ds.test[p["row"]].tolist())
        q = _reference_embedding(env["lm"], env["tok"], p["prediction"] or env["tok"].eos_token)
        dist = np.linalg.norm(emb - q, axis=1)
        want = np.lexsort((np.arange(len(dist)), dist))[:20] + 1
        # allow float-level reordering of near ties only
        assert p["top"][:5] == list(want[:5]) or np.allclose(
            np.sort(dist[np.asarray(p["top"][:5]) - 1]), np.sort(dist)[:5], atol=1e-5
        )
    # per-user loss (paper Fig. 6 groups): the tuned model's plain loss of the first test item
    from llm_bridge.model import add_lora as _add, load_tokenizer_and_model as _load
    from llm_bridge.prompts import encode_sample

    _, ref_model, _ = _load(env["model"], device="cpu", dtype="float32")
    ref_model = _add(ref_model, adapter=adapter, trainable=False).eval()
    for p in preds[:3]:
        hist = [ds.titles[i] for i in np.concatenate([ds.train[p["row"]], ds.valid[p["row"]]])]
        s = encode_sample(env["tok"], hist, ds.titles[int(ds.test[p["row"]][0])], cutoff_len=512)
        with torch.no_grad():
            ref = ref_model(
                input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])
            ).loss.item()
        assert p["loss"] == pytest.approx(ref, rel=1e-4)
    again = evaluate.rank_metrics([p["top"] for p in preds], [set(p["truth"]) for p in preds])
    for k, v in again.items():
        assert m[k] == pytest.approx(v)
    # the adapter really changes generation but not grounding: embeddings are base-model ones
    from llm_bridge.model import add_lora, load_tokenizer_and_model

    _, tuned, _ = load_tokenizer_and_model(env["model"], device="cpu", dtype="float32")
    tuned = add_lora(tuned, adapter=adapter, trainable=False)
    on = _reference_embedding(tuned, env["tok"], "Game 3 of series A0")
    off = evaluate.embed_texts(tuned, env["tok"], ["Game 3 of series A0"])[0]
    assert not np.allclose(on, off, atol=1e-3)
    np.testing.assert_allclose(
        off, _reference_embedding(env["lm"], env["tok"], "Game 3 of series A0"), atol=1e-5
    )


def test_bad_input(env, tmp_path, capsys):
    base = dict(
        data=str(env["data"]),
        model=env["model"],
        out=str(tmp_path / "m.json"),
        device="cpu",
        dtype="float32",
        cache_dir=str(tmp_path / "c"),
    )
    with pytest.raises(UserError, match="adapter"):
        evaluate.main(EvaluateConfig(adapter=str(tmp_path / "nope"), **base))
    with pytest.raises(UserError, match="split"):
        evaluate.main(EvaluateConfig(split="train", **base))
    with pytest.raises(UserError, match="split"):
        evaluate.main(EvaluateConfig(split="tset", **base))
    assert not (tmp_path / "m.json").exists()
    from jaxrec.cli import main as cli

    code = cli(
        [
            "evaluate",
            "--data",
            str(env["data"]),
            "--split",
            "bogus",
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- real SmolLM2
def _games_slice(out, n_users: int = 3, seed: int = 0):
    """A dataset folder of ``n_users`` Games users with test items, their items renumbered
    1..m with their real titles (so that grounding ranks m items, not 17,332)."""
    ds = load_dataset(GAMES)
    rows = np.sort(
        np.random.default_rng(seed).choice(
            [u for u in range(ds.n_users) if len(ds.test[u]) and len(ds.train[u]) > 1],
            n_users,
            replace=False,
        )
    )
    items = sorted({int(i) for r in rows for s in (ds.train, ds.valid, ds.test) for i in s[r]})
    new = {old: k + 1 for k, old in enumerate(items)}
    out.mkdir(parents=True)
    for name in ("train", "valid", "test"):
        seqs = ds.split(name)
        (out / f"sequential_{name}.txt").write_text(
            "".join(
                " ".join(map(str, [k + 1, *[new[int(i)] for i in seqs[r]]])) + "\n"
                for k, r in enumerate(rows)
            )
        )
    (out / "items.jsonl").write_text(
        "".join(json.dumps({"item_id": new[i], "title": ds.titles[i]}) + "\n" for i in items)
    )
    return out


@pytest.mark.slow
@pytest.mark.skipif(not games_available(), reason="Games data not found")
def test_smollm2_finetune_and_evaluate_games_users(tmp_path, smollm2):
    """The real SmolLM2 fine-tuned on 2 Games users (from the session's de-quantised folder: the
    ``smollm2`` fixture) and evaluated on them with the default model (``model=""``: the
    embedded GGUF, de-quantised by evaluate itself, as `dealrec evaluate` without --model
    does; its default-model branches, the title-embedding cache key and the metrics' model
    name, are tested here)."""
    from jaxrec.data import save_scores
    from llm_bridge import finetune
    from llm_bridge.config import FinetuneConfig

    data = _games_slice(tmp_path / "games2", n_users=2)
    ds = load_dataset(data)
    sel = save_scores(
        tmp_path / "sel.npy", np.arange(ds.n_users), kind="selection", dataset=ds.fingerprint()
    )
    finetune.main(
        FinetuneConfig(
            data=str(data),
            selection=str(sel),
            out=str(tmp_path / "ad"),
            model=str(smollm2[0]),
            epochs=1,
            batch_size=2,
            grad_accum=1,
            cutoff_len=192,
            device="cpu",
            seed=0,
        )
    )
    record = json.loads((tmp_path / "ad" / "train_record.json").read_text())
    assert record["n_train_samples"] == 2 and 0 < record["epochs"][0]["train_loss"] < 20
    out = tmp_path / "metrics.json"
    evaluate.main(
        EvaluateConfig(
            data=str(data),
            adapter=str(tmp_path / "ad"),
            split="test",
            max_new_tokens=12,
            beams=2,
            batch_size=2,
            cutoff_len=192,
            out=str(out),
            device="cpu",
            cache_dir=str(tmp_path / "cache"),
            seed=0,
        )
    )
    m = json.loads(out.read_text())
    assert m["n_users"] == 2 and 0 <= m["recall@20"] <= 1 and 0 <= m["ndcg@20"] <= 1
    assert m["model"] == "default (SmolLM2-135M-Instruct GGUF)"
    assert m["model_info"]["kind"] == "gguf"
    preds = [json.loads(x) for x in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and any(p["prediction"] for p in preds)
    assert all(len(p["top"]) == min(20, ds.n_items) for p in preds)


@pytest.mark.parametrize("damage", ["truncated weights", "invalid adapter_config.json"])
def test_a_damaged_adapter_is_a_one_line_error(env, adapter, tmp_path, capsys, damage):
    import shutil

    from jaxrec.cli import main as cli

    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    if damage == "truncated weights":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (folder / "adapter_config.json").write_text("{not json")
    out = tmp_path / "m.json"
    argv = ["evaluate", "--data", str(env["data"]), "--model", env["model"], "--adapter"]
    code = cli(
        [*argv, str(folder), "--out", str(out), "--device", "cpu", "--cache-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's progress bars
    assert code == 2 and err.startswith("dealrec evaluate: error:")
    assert str(folder) in err and "damaged" in err
    assert not out.exists()
