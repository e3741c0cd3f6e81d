"""Data layer: alignment, padding, bad-input errors naming file and line, score files."""

import json
import os

import numpy as np
import pytest

from jaxrec.cli import main as cli
from jaxrec.data import (
    evaluation_arrays,
    left_pad,
    load_dataset,
    load_scores,
    save_scores,
    training_arrays,
)
from jaxrec.errors import DataError, ScoreFileError


def write(dir_, train, valid=None, test=None, n_items=5):
    dir_.mkdir(parents=True, exist_ok=True)
    valid = valid or [[u[0]] for u in train]
    test = test or [[u[0]] for u in train]
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        (dir_ / f"sequential_{name}.txt").write_text(
            "".join(" ".join(map(str, r)) + "\n" for r in rows)
        )
    (dir_ / "items.jsonl").write_text(
        "".join(json.dumps({"item_id": i, "title": f"T{i}"}) + "\n" for i in range(1, n_items + 1))
    )
    return dir_


def test_alignment_and_left_padding(tmp_path):
    d = write(
        tmp_path / "d",
        [[7, 1, 2, 3], [3, 4], [9, 5, 1]],
        valid=[[7], [3, 5], [9]],
        test=[[7, 4], [3], [9, 2, 3]],
    )
    ds = load_dataset(d)
    assert ds.n_users == 3 and ds.n_items == 5
    assert list(ds.user_ids) == [7, 3, 9]
    arr = training_arrays(ds, max_len=4)
    # whole train sequence: inputs = train[:-1], targets = train[1:], newest in the last column
    np.testing.assert_array_equal(arr["inputs"], [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 5]])
    np.testing.assert_array_equal(arr["targets"], [[0, 0, 2, 3], [0, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(left_pad([np.arange(1, 7)], 3), [[4, 5, 6]])
    ev = evaluation_arrays(ds, "test", max_len=4)
    assert list(ev["users"]) == [0, 2]  # user 3 has no test items
    np.testing.assert_array_equal(ev["inputs"][0], [0, 1, 2, 3])
    np.testing.assert_array_equal(ev["inputs"][1], [0, 0, 5, 1])
    ev = evaluation_arrays(ds, "valid", max_len=4)  # user 3's valid item 5
    assert list(ev["users"]) == [1]
    np.testing.assert_array_equal(ev["inputs"][0], [0, 0, 0, 4])


def test_test_history_includes_valid(tmp_path):
    d = write(tmp_path / "d", [[1, 1, 2]], valid=[[1, 3]], test=[[1, 4]])
    ev = evaluation_arrays(load_dataset(d), "test", max_len=4)
    np.testing.assert_array_equal(ev["inputs"][0], [0, 1, 2, 3])
    assert set(ev["seen"][0]) - {0} == {1, 2, 3}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "sequential_valid.txt").unlink(), "sequential_valid.txt: file not found"),
        (
            lambda d: (d / "sequential_train.txt").write_text("1 2 x\n2 3\n"),
            "sequential_train.txt:1: non-integer token 'x'",
        ),
        (
            lambda d: (d / "sequential_test.txt").write_text("1\n2 9\n"),
            "sequential_test.txt:2: item id 9 out of range 1..5",
        ),
        (lambda d: (d / "sequential_valid.txt").write_text("1\n"), "1 lines, but sequential_train"),
        (
            lambda d: [
                (d / f"sequential_{s}.txt").write_text("") for s in ("train", "valid", "test")
            ],
            "empty dataset",
        ),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, mutate, message):
    d = write(tmp_path / "d", [[1, 1, 2], [2, 3]])
    mutate(d)
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load_dataset(d)


def test_cli_bad_data_is_one_line_exit_2(tmp_path, capsys):
    d = write(tmp_path / "d", [[1, 1, 2], [2, 3]])
    (d / "sequential_train.txt").write_text("1 2 x\n2 3\n")
    out = tmp_path / "run"
    assert cli(["train-surrogate", "--data", str(d), "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sequential_train.txt:1" in err
    assert not out.exists()


def test_manifests_record_the_environment(tmp_path):
    import platform

    import jax

    fp = {"train_sha256": "abc", "n_users": 2}
    path = save_scores(tmp_path / "s.npy", np.zeros(2), kind="influence", dataset=fp)
    env = load_scores(path, kind="influence", dataset=fp)[1]["environment"]
    assert env["python"] == platform.python_version() and env["cpus"] == os.cpu_count()
    assert env["libraries"]["numpy"] == np.__version__
    assert env["libraries"]["jax"] == jax.__version__  # imported, so recorded


def test_score_files_roundtrip_and_checks(tmp_path):
    fp = {"train_sha256": "abc", "n_users": 3}
    path = save_scores(
        tmp_path / "s.npy",
        np.array([1.0, 2.0, 3.0]),
        kind="influence",
        dataset=fp,
        options={"solver": "cg"},
        seconds=1.5,
    )
    arr, manifest = load_scores(path, kind="influence", dataset=fp)
    assert arr.dtype == np.float32 and manifest["options"] == {"solver": "cg"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp
    with pytest.raises(ScoreFileError, match="kind is 'influence'"):
        load_scores(path, kind="effort", dataset=fp)
    with pytest.raises(ScoreFileError, match="another dataset"):
        load_scores(path, kind="influence", dataset={"train_sha256": "x", "n_users": 3})
    with pytest.raises(ScoreFileError, match="made for 3 users"):
        load_scores(path, dataset={"train_sha256": "abc", "n_users": 4})
    sel = save_scores(tmp_path / "sel.npy", np.array([2, 0]), kind="selection", dataset=fp)
    assert load_scores(sel)[0].dtype == np.int64


def test_outputs_honour_the_umask(tmp_path):
    """A file written atomically has the permissions ``open()`` gives (not mkstemp's 0600)."""
    import os

    from jaxrec.data.scorefiles import atomic_write_bytes, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        atomic_write_bytes(tmp_path / "b.bin", lambda f: f.write(b"1"))
        with open(tmp_path / "plain", "w") as f:
            f.write("1")
        os.umask(0o077)
        write_json(tmp_path / "c.json", {"x": 1})
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert mode == {"a.json": 0o644, "b.bin": 0o644, "plain": 0o644, "c.json": 0o600}
