"""A seeded user slice of a dataset, written as a dataset folder of its own (for CPU demos)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from jaxrec.data.dataset import SPLITS, Dataset
from jaxrec.errors import UserError


def write_user_subset(
    ds: Dataset, out: str | Path, *, n_users: int, seed: int = 0, only_their_items: bool = False
) -> Path:
    """Write ``n_users`` users of ``ds`` (seeded, kept in their original order) to ``out``.

    By default item ids and ``items.jsonl`` are kept unchanged (every item stays rankable).
    With ``only_their_items`` the item catalogue shrinks to the items these users have in any
    split, renumbered 1..m in the order of their original ids (``source_id`` and ``title`` are
    kept): a smaller universe that makes LLM grounding affordable on a CPU.
    """
    if not 0 < n_users <= ds.n_users:
        raise UserError(f"n_users must be in 1..{ds.n_users}, got {n_users}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ds.n_users, size=n_users, replace=False))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if only_their_items:
        kept = np.unique(np.concatenate([ds.split(s)[r] for s in SPLITS for r in rows]))
        new_id = np.zeros(ds.n_items + 1, dtype=np.int64)
        new_id[kept] = np.arange(1, len(kept) + 1)
    else:
        kept, new_id = None, np.arange(ds.n_items + 1)
    for name in SPLITS:
        seqs = ds.split(name)
        text = "\n".join(" ".join(map(str, [ds.user_ids[r], *new_id[seqs[r]]])) for r in rows)
        (out / f"sequential_{name}.txt").write_text(text + "\n")
    if kept is None:
        shutil.copyfile(ds.path / "items.jsonl", out / "items.jsonl")
    else:
        with open(ds.path / "items.jsonl", encoding="utf-8") as f:
            records = {int(r["item_id"]): r for r in map(json.loads, filter(str.strip, f))}
        with open(out / "items.jsonl", "w", encoding="utf-8") as f:
            for old in kept:
                f.write(json.dumps({**records[int(old)], "item_id": int(new_id[old])}) + "\n")
    return out
