"""Load a DEALRec dataset folder into NumPy arrays (NumPy only: the PyTorch side uses it too).

A dataset folder holds (see ``shared/data/README.md``):

* ``sequential_{train,valid,test}.txt``: one line per user, the same users in the same order in
  all three files; a line is the 1-based user id followed by that user's 1-based item ids in
  time order for that period;
* ``items.jsonl``: one JSON object per item with ``item_id`` (1..n_items) and ``title``.

One training sample per user, in the line order of ``sequential_train.txt``: every score file
(influence, effort, selection) is aligned to that order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxrec.errors import DataError

SPLITS = ("train", "valid", "test")
MAX_LEN = 50


@dataclass(frozen=True)
class Dataset:
    """A recommendation dataset: per-user item sequences for each period, and item titles.

    Attributes:
      path: the dataset folder.
      user_ids: ``[n_users]`` the user id of each line (1-based, as in the files).
      train, valid, test: one int64 array of item ids (1-based, time order) per user.
      titles: ``titles[i]`` is the title of item ``i``; ``titles[0]`` is ``""`` (padding).
      train_sha256: sha256 of ``sequential_train.txt``; the fingerprint of every score file.
    """

    path: Path
    user_ids: np.ndarray
    train: list[np.ndarray]
    valid: list[np.ndarray]
    test: list[np.ndarray]
    titles: list[str]
    train_sha256: str
    categories: list[list[str]] = field(default_factory=list, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.train)

    @property
    def n_items(self) -> int:
        return len(self.titles) - 1

    @property
    def has_sample(self) -> np.ndarray:
        """``[n_users]`` bool: whether the user has a training sample (at least one train
        item). A user with every interaction after the split time has none: every stage
        accepts it (its influence and effort scores are 0, its loss term being absent), and
        no selection method picks it (:func:`jaxrec.select.select`'s ``eligible``)."""
        return np.fromiter((len(t) > 0 for t in self.train), bool, self.n_users)

    def fingerprint(self) -> dict:
        """The identity every score file carries: ``{"train_sha256", "n_users"}``."""
        return {"train_sha256": self.train_sha256, "n_users": self.n_users}

    def split(self, name: str) -> list[np.ndarray]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_sequences(path: Path, n_items: int | None) -> tuple[np.ndarray, list[np.ndarray]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    user_ids: list[int] = []
    seqs: list[np.ndarray] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                raise DataError(f"{path}:{lineno}: empty line (expected a user id)")
            try:
                values = [int(t) for t in tokens]
            except ValueError:
                bad = next(t for t in tokens if not t.lstrip("-").isdigit())
                raise DataError(f"{path}:{lineno}: non-integer token {bad!r}") from None
            items = np.asarray(values[1:], dtype=np.int64)
            if items.size and (items.min() < 1 or (n_items is not None and items.max() > n_items)):
                out = int(items[(items < 1) | (items > (n_items or np.inf))][0])
                raise DataError(f"{path}:{lineno}: item id {out} out of range 1..{n_items}")
            user_ids.append(values[0])
            seqs.append(items)
    if not seqs:
        raise DataError(f"{path}: empty dataset (no users)")
    return np.asarray(user_ids, dtype=np.int64), seqs


def _read_items(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                item_id = int(rec["item_id"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: bad item record ({e})") from None
            if item_id < 1 or item_id in records:
                raise DataError(f"{path}:{lineno}: item_id {item_id} is < 1 or repeated")
            records[item_id] = rec
    if not records:
        raise DataError(f"{path}: empty dataset (no items)")
    n_items = max(records)
    missing = sorted(set(range(1, n_items + 1)) - set(records))
    if missing:
        raise DataError(f"{path}: item ids are not contiguous (missing {missing[0]})")
    titles = [""] + [str(records[i].get("title") or f"title_{i}") for i in range(1, n_items + 1)]
    cats = [[]] + [list(records[i].get("categories") or []) for i in range(1, n_items + 1)]
    return titles, cats


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset folder; raise :class:`DataError` naming the file and line on bad input."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: dataset folder not found")
    titles, categories = _read_items(path / "items.jsonl")
    n_items = len(titles) - 1
    users: np.ndarray | None = None
    splits: dict[str, list[np.ndarray]] = {}
    for name in SPLITS:
        file = path / f"sequential_{name}.txt"
        ids, seqs = _read_sequences(file, n_items)
        if users is None:
            users = ids
        elif len(ids) != len(users):
            raise DataError(f"{file}: {len(ids)} lines, but sequential_train.txt has {len(users)}")
        elif not np.array_equal(ids, users):
            line = int(np.flatnonzero(ids != users)[0]) + 1
            raise DataError(f"{file}:{line}: user id {ids[line - 1]} differs from the train file")
        splits[name] = seqs
    assert users is not None  # SPLITS is not empty
    return Dataset(
        path=path,
        user_ids=users,
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        titles=titles,
        categories=categories,
        train_sha256=sha256_file(path / "sequential_train.txt"),
    )


def left_pad(seqs: list[np.ndarray], max_len: int = MAX_LEN) -> np.ndarray:
    """Stack sequences into ``[n, max_len]`` int32, keeping the last ``max_len`` items, 0-padded
    on the left (so the newest item is always in the last column)."""
    out = np.zeros((len(seqs), max_len), dtype=np.int32)
    for row, seq in enumerate(seqs):
        seq = seq[-max_len:]
        if len(seq):
            out[row, max_len - len(seq) :] = seq
    return out


def training_arrays(ds: Dataset, max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """One next-item training sample per user, aligned to ``sequential_train.txt``.

    The whole train sequence is used: inputs are ``train[:-1]`` and targets ``train[1:]`` (the
    last train item, the LLM's target, is also the surrogate's last target). Returns
    ``{"inputs", "targets"}`` of shape ``[n_users, max_len]`` int32, left-padded with 0, and
    ``"index"``: ``[n_users]`` int32, the row number (used to derive reproducible negatives).
    """
    inputs = left_pad([s[:-1] for s in ds.train], max_len)
    targets = left_pad([s[1:] for s in ds.train], max_len)
    return {"inputs": inputs, "targets": targets, "index": np.arange(ds.n_users, dtype=np.int32)}


def history(ds: Dataset, split: str) -> list[np.ndarray]:
    """The items a user had before ``split``: train for valid, train + valid for test."""
    if split == "valid":
        return list(ds.train)
    if split == "test":
        return [np.concatenate([t, v]) for t, v in zip(ds.train, ds.valid)]
    raise DataError(f"split must be 'valid' or 'test', not {split!r}")


def evaluation_arrays(ds: Dataset, split: str, max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """Full-ranking evaluation inputs for users with at least one item in ``split``.

    Returns ``{"users": [m] row numbers, "inputs": [m, max_len] left-padded history,
    "seen": [m, S] items to mask (the whole history, 0-padded), "truth": [m, T] the user's split
    items (0-padded)}``.
    """
    hist = history(ds, split)
    truth = [np.unique(t) for t in ds.split(split)]  # a repeated purchase counts once
    users = np.asarray([u for u in range(ds.n_users) if len(truth[u])], dtype=np.int32)
    if users.size == 0:
        raise DataError(f"{ds.path}: no user has items in the {split} split")
    return {
        "users": users,
        "inputs": left_pad([hist[u] for u in users], max_len),
        "seen": left_pad([hist[u] for u in users], max(1, max(len(hist[u]) for u in users))),
        "truth": left_pad([truth[u] for u in users], max(1, max(len(truth[u]) for u in users))),
    }
