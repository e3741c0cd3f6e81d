"""A seeded user slice of a dataset, written as a dataset folder of its own (for CPU demos)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from jaxrec.data.dataset import SPLITS, Dataset
from jaxrec.errors import UserError


def write_user_subset(ds: Dataset, out: str | Path, *, n_users: int, seed: int = 0,
                      min_test_fraction: float = 0.0) -> Path:
    """Write ``n_users`` users of ``ds`` (seeded, kept in their original order) to ``out``.

    Item ids and ``items.jsonl`` are kept unchanged, so titles and item scores stay comparable
    with the full dataset.
    """
    if not 0 < n_users <= ds.n_users:
        raise UserError(f"n_users must be in 1..{ds.n_users}, got {n_users}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ds.n_users, size=n_users, replace=False))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        seqs = ds.split(name)
        text = "\n".join(" ".join(map(str, [ds.user_ids[r], *seqs[r]])) for r in rows)
        (out / f"sequential_{name}.txt").write_text(text + "\n")
    shutil.copyfile(ds.path / "items.jsonl", out / "items.jsonl")
    return out
