"""dealrec prepare: rating filter, k-core, global-time 8:1:1 split, on a hand-made review file."""

import json

from jaxrec.cli import main as cli
from jaxrec.data import load_dataset


def test_prepare_hand_made(tmp_path):
    reviews = []
    t = 0
    # 4 users x 3 items all rated 5 (a 2-core survives); user "z" rated low -> dropped
    for u in "abcd":
        for i in ("I1", "I2", "I3"):
            t += 1
            reviews.append({"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t})
    reviews.append({"reviewerID": "z", "asin": "I1", "overall": 2.0, "unixReviewTime": 0})
    reviews.append({"reviewerID": "y", "asin": "I9", "overall": 5.0, "unixReviewTime": 1})
    (tmp_path / "r.json").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    meta = [
        {"asin": "I1", "title": "One", "categories": [["Video Games", "PC"]]},
        "{'asin': 'I2', 'title': 'Two', 'categories': [['Video Games']]}",
    ]
    (tmp_path / "m.json").write_text(
        "".join((m if isinstance(m, str) else json.dumps(m)) + "\n" for m in meta)
    )
    out = tmp_path / "ds"
    assert (
        cli(
            [
                "prepare",
                "--reviews",
                str(tmp_path / "r.json"),
                "--meta",
                str(tmp_path / "m.json"),
                "--out",
                str(out),
                "--k-core",
                "2",
            ]
        )
        == 0
    )
    ds = load_dataset(out)
    # 12 interactions sorted by time: first 9 (users a, b, c) train, 10th valid, last 2 test
    assert ds.n_users == 3 and ds.n_items == 3  # user d has no train item
    assert [list(s) for s in ds.train] == [[1, 2, 3]] * 3
    assert sum(len(s) for s in ds.valid) == 0 and sum(len(s) for s in ds.test) == 0
    assert ds.titles[1:] == ["One", "Two", "title_3"]
    assert ds.categories[1] == ["Video Games", "PC"]


def test_prepare_bad_line(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"reviewerID": "a"}\n')
    (tmp_path / "m.json").write_text("")
    assert (
        cli(
            [
                "prepare",
                "--reviews",
                str(tmp_path / "r.json"),
                "--meta",
                str(tmp_path / "m.json"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "r.json:1: bad review record" in capsys.readouterr().err
