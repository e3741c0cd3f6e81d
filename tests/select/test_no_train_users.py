"""Users with no training item (every interaction after the split time; ~1 % of users of some of
the paper's datasets): every stage accepts them, their influence and effort scores are 0, no
selection method picks them (``n`` counts only users with a sample), and the whole TIGER and
BIGRec pipelines run on such data."""

import json

import numpy as np
import pytest
import yaml

from jaxrec.cli import main as cli
from jaxrec.data import load_dataset, load_scores
from jaxrec.data.synthetic import make_synthetic
from jaxrec.errors import UserError
from jaxrec.select import METHODS, REQUIRES, select


def test_synthetic_users_without_train_items():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        plain = load_dataset(make_synthetic(f"{tmp}/a", n_users=50, n_items=20, seed=1))
        ds = load_dataset(make_synthetic(f"{tmp}/b", n_users=50, n_items=20, seed=1, no_train=4))
    empty = np.flatnonzero(~ds.has_sample)
    assert empty.size == 4 and plain.has_sample.all()
    for u in range(50):  # the same walks: the chosen users' items all moved after the split
        items = [np.concatenate([d.train[u], d.valid[u], d.test[u]]) for d in (plain, ds)]
        assert items[0].tolist() == items[1].tolist()
        if u not in empty:
            assert ds.train[u].tolist() == plain.train[u].tolist()
    assert all(len(ds.valid[u]) == 2 and len(ds.test[u]) > 0 for u in empty)


@pytest.mark.parametrize("method", METHODS)
def test_no_method_picks_a_user_without_a_sample(method):
    rng = np.random.default_rng(0)
    n_users = 60
    eligible = np.ones(n_users, bool)
    eligible[[0, 7, 30, 59]] = False
    inputs = {
        "influence": rng.normal(size=n_users),
        "effort": rng.random(n_users),
        "grand": rng.random(n_users),
        "el2n": rng.random(n_users),
        "representations": rng.normal(size=(n_users, 4)),
        "interactions": rng.integers(1, 9, n_users),
    }
    given = {k: v for k, v in inputs.items() if k in REQUIRES[method]}
    options = dict(seed=0, n_total=n_users, groups=4, clusters=3)
    n = 40
    sel = select(method, n, eligible=eligible, **options, **given)
    assert eligible[sel.indices].all()
    assert sel.indices.size == (eligible.sum() if method == "all" else n)
    if method != "all":
        with pytest.raises(UserError):
            select(method, 57, eligible=eligible, **options, **given)  # 56 have a sample
        # with every user eligible, the mask changes nothing
        plain = select(method, 20, **options, **given)
        masked = select(method, 20, eligible=np.ones(n_users, bool), **options, **given)
        assert plain.indices.tolist() == masked.indices.tolist()
        # on the eligible rows alone the method makes the same choice
        rows = np.flatnonzero(eligible)
        alone = select(
            method,
            20,
            **{**options, "n_total": rows.size},
            **{k: v[rows] for k, v in given.items()},
        )
        assert select(method, 20, eligible=eligible, **options, **given).indices.tolist() == (
            rows[alone.indices].tolist()
        )


def _check_run(work, ds):
    empty = np.flatnonzero(~ds.has_sample)
    for kind in ("influence", "effort"):
        scores, _ = load_scores(work / f"{kind}.npy", kind=kind)
        assert np.isfinite(scores).all() and (scores[empty] == 0).all()
        assert (scores[ds.has_sample] != 0).any()
    selected, manifest = load_scores(work / "selected.npy", kind="selection")
    assert not np.isin(selected, empty).any()
    assert manifest["selection"]["users_without_sample"] == empty.size
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["n_users"] > 0 and 0.0 <= metrics["recall@10"] <= 1.0


def test_tiger_pipeline_with_users_without_train_items(tmp_path):
    pytest.importorskip("llm_bridge.tiger.effort")
    data = make_synthetic(
        tmp_path / "data", n_users=60, n_items=30, n_clusters=3, max_len=8, seed=3, no_train=4
    )
    cfg = {
        "pipeline": {"workdir": str(tmp_path / "work"), "data": str(data), "backend": "tiger"},
        "surrogate": {"epochs": 1, "batch_size": 32},
        "influence": {"steps": 20, "lissa_batch_size": 8},
        "semantic_ids": {"method": "rkmeans", "codebook_size": 4, "cache_dir": str(tmp_path)},
        "effort": {"batch_size": 32, "device": "cpu"},
        "select": {"n": 12, "groups": 4},
        "finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 16, "grad_accum": 1, "device": "cpu"},
        "evaluate": {"beams": 20, "batch_size": 16, "device": "cpu"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["run", str(path)]) == 0
    _check_run(tmp_path / "work", load_dataset(data))


def test_bigrec_pipeline_with_users_without_train_items(tmp_path):
    from tests.support import tiny_llama

    data = make_synthetic(
        tmp_path / "data", n_users=50, n_items=30, n_clusters=3, max_len=6, seed=2, no_train=4
    )
    llm = {"model": str(tiny_llama(tmp_path / "model")), "device": "cpu", "dtype": "float32"}
    llm["cutoff_len"] = 256
    cfg = {
        "pipeline": {"workdir": str(tmp_path / "work"), "data": str(data)},
        "surrogate": {"epochs": 1, "batch_size": 32},
        "influence": {"steps": 20, "lissa_batch_size": 8},
        "effort": {**llm, "batch_size": 8},
        "select": {"n": 6, "groups": 3},
        "finetune": {**llm, "epochs": 1, "batch_size": 4, "grad_accum": 1},
        "evaluate": {**llm, "beams": 2, "max_new_tokens": 8},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["run", str(path)]) == 0
    _check_run(tmp_path / "work", load_dataset(data))
