"""``dealrec prepare``: raw Amazon review files -> a dataset folder, the way the paper did it.

1. keep reviews rated ``>= min_rating`` (4), one interaction per (user, item) (the earliest);
2. k-core filter: drop users and items with fewer than ``k_core`` interactions, repeatedly,
   until none is left;
3. sort all interactions by global timestamp and cut them 8:1:1 into train / valid / test
   periods (so the test period is strictly later than training, as in the paper);
4. drop users with no train interaction (nothing to learn from), number users by first
   interaction and items by first appearance, and write ``sequential_*.txt`` + ``items.jsonl``.

Inputs are JSON lines; metadata lines in the older Python-literal format of the 2014 Amazon
release are read with :func:`ast.literal_eval` (safe: literals only, never code).
"""

from __future__ import annotations

import ast
import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from jaxrec.config import PrepareConfig
from jaxrec.errors import DataError, UserError


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return (
        gzip.open(path, "rt", encoding="utf-8")
        if path.suffix == ".gz"
        else open(path, encoding="utf-8")
    )


def _records(path: Path):
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                try:
                    rec = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise DataError(f"{path}:{lineno}: not a JSON object") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: not a JSON object")
            yield lineno, rec


def read_reviews(path: Path, min_rating: float) -> list[tuple[int, str, str]]:
    """``[(time, user, item)]`` of the reviews rated ``>= min_rating``, earliest per pair."""
    first: dict[tuple[str, str], int] = {}
    for lineno, rec in _records(path):
        try:
            user, item = str(rec["reviewerID"]), str(rec["asin"])
            rating, when = float(rec["overall"]), int(rec["unixReviewTime"])
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: bad review record ({e})") from None
        if rating >= min_rating and when < first.get((user, item), when + 1):
            first[(user, item)] = when
    return [(t, u, i) for (u, i), t in first.items()]


def k_core(interactions: list[tuple[int, str, str]], k: int) -> list[tuple[int, str, str]]:
    """Drop users and items with fewer than ``k`` interactions until none is left."""
    while True:
        users = Counter(u for _, u, _ in interactions)
        items = Counter(i for _, _, i in interactions)
        kept = [x for x in interactions if users[x[1]] >= k and items[x[2]] >= k]
        if len(kept) == len(interactions):
            return kept
        interactions = kept


def split_by_time(
    interactions: Iterable[tuple], ratios: Sequence[int] = (8, 1, 1)
) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Sort by global time (ties by user, item) and cut into consecutive periods."""
    ordered = sorted(interactions)
    n, total = len(ordered), sum(ratios)
    cut1 = n * ratios[0] // total
    cut2 = n * (ratios[0] + ratios[1]) // total
    return ordered[:cut1], ordered[cut1:cut2], ordered[cut2:]


def prepare(cfg: PrepareConfig) -> Path:
    """Write the dataset folder ``cfg.out`` from raw review and metadata files."""
    if not cfg.reviews or not cfg.meta:
        raise UserError("--reviews and --meta are required")
    try:
        ratios = tuple(int(x) for x in cfg.split.split(":"))
        assert len(ratios) == 3 and min(ratios) >= 0 and ratios[0] > 0
    except (ValueError, AssertionError):
        raise UserError(f"--split must look like 8:1:1, got {cfg.split!r}") from None
    interactions = k_core(read_reviews(Path(cfg.reviews), cfg.min_rating), cfg.k_core)
    if not interactions:
        raise UserError(f"{cfg.reviews}: no interaction survives rating and {cfg.k_core}-core")
    periods = split_by_time(interactions, ratios)
    train_users = {u for _, u, _ in periods[0]}
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    for _t, u, i in sorted(interactions):
        if u in train_users:
            user_ids.setdefault(u, len(user_ids) + 1)
            item_ids.setdefault(i, len(item_ids) + 1)
    meta = {}
    for _, rec in _records(Path(cfg.meta)):
        if str(rec.get("asin")) in item_ids:
            meta[str(rec["asin"])] = rec
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, period in zip(("train", "valid", "test"), periods):
        seqs = defaultdict(list)
        for _, u, i in period:
            if u in user_ids:
                seqs[u].append(item_ids[i])
        lines = [" ".join(map(str, [uid, *seqs[u]])) for u, uid in user_ids.items()]
        (out / f"sequential_{name}.txt").write_text("\n".join(lines) + "\n")
    with open(out / "items.jsonl", "w", encoding="utf-8") as f:
        for asin, iid in item_ids.items():
            rec = meta.get(asin, {})
            cats = rec.get("categories") or rec.get("category") or []
            if cats and isinstance(cats[0], list):  # 2014 format: list of category paths
                cats = cats[0]
            title = str(rec.get("title") or "").strip() or f"title_{iid}"
            f.write(
                json.dumps(
                    {
                        "item_id": iid,
                        "source_id": asin,
                        "title": title,
                        "categories": [str(c) for c in cats],
                    }
                )
                + "\n"
            )
    return out


def main(cfg: PrepareConfig) -> int:
    out = prepare(cfg)
    print(f"wrote {out}")
    return 0
