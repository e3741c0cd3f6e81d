"""A seeded synthetic dataset in the on-disk format of the real one, with a planted structure.

Items are split into ``n_clusters`` clusters laid out as rings. Each user belongs to one cluster
and walks its ring: the next item is usually the ring successor of the current one (with
probability ``p_next``), else a random item of the cluster. The whole walk is cut into train /
valid / test periods (most users get no valid or test items, as in Games). A sequential model
learns "successor in ring" quickly, so Recall@10 far above random is a real learning signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def make_synthetic(
    out: str | Path,
    *,
    n_users: int = 300,
    n_items: int = 120,
    n_clusters: int = 6,
    min_len: int = 3,
    max_len: int = 20,
    p_next: float = 0.8,
    eval_fraction: float = 0.5,
    seed: int = 0,
    no_train: int = 0,
) -> Path:
    """Write a synthetic dataset folder to ``out`` and return its path.

    ``no_train`` users (a seeded choice, drawn after everything else so the rest of the data
    does not change) have every interaction after the split time, as about 1 % of users of
    some of the paper's datasets: an empty train sequence, the first two items of their walk
    as valid items and the rest as test items."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clusters = np.array_split(np.arange(1, n_items + 1), n_clusters)
    lines: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for user in range(1, n_users + 1):
        ring = clusters[rng.integers(n_clusters)]
        length = int(rng.integers(min_len, max_len + 1))
        pos = int(rng.integers(len(ring)))
        walk = []
        for _ in range(length + 4):
            walk.append(int(ring[pos]))
            pos = (pos + 1) % len(ring) if rng.random() < p_next else int(rng.integers(len(ring)))
        train, rest = walk[:length], walk[length:]
        has_eval = rng.random() < eval_fraction
        valid = rest[:2] if has_eval and rng.random() < 0.5 else []
        test = rest[2:] if has_eval else []
        for name, seq in (("train", train), ("valid", valid), ("test", test)):
            lines[name].append(" ".join(map(str, [user, *seq])))
    if no_train:
        chosen = np.random.default_rng([seed, 1]).choice(n_users, no_train, replace=False)
        for row in chosen:
            items = [int(x) for name in lines for x in lines[name][row].split()[1:]]
            user = row + 1
            lines["train"][row] = str(user)
            lines["valid"][row] = " ".join(map(str, [user, *items[:2]]))
            lines["test"][row] = " ".join(map(str, [user, *items[2:]]))
    for name, rows in lines.items():
        (out / f"sequential_{name}.txt").write_text("\n".join(rows) + "\n")
    _write_items(out / "items.jsonl", clusters)
    return out


def _write_items(path: Path, clusters: list[np.ndarray]) -> None:
    """``items.jsonl``: every item with a title naming its cluster (a game series)."""
    with open(path, "w", encoding="utf-8") as f:
        for c, ring in enumerate(clusters):
            for _rank, item in enumerate(ring):
                f.write(
                    json.dumps(
                        {
                            "item_id": int(item),
                            "source_id": f"SYN{item:05d}",
                            "title": f"Game {item} of series {chr(65 + c % 26)}{c}",
                            "categories": ["Video Games", f"Series {c}"],
                        }
                    )
                    + "\n"
                )
