"""One finished run as a results row: its metrics, its per-user metrics and test losses (from
its predictions or from the archive it was restored from), the user groups of paper Fig. 6,
and adding a run to an archive."""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path
from typing import Literal

import numpy as np

from jaxrec.archive import RunArchive
from jaxrec.data.ranking import per_user_recall_ndcg
from jaxrec.errors import UserError
from jaxrec.experiment.grid import LOSS, METRICS, Cell
from jaxrec.stages import PER_RUN


def per_user_metrics(
    predictions: Path, ks: Sequence[int] = (10, 20)
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every evaluated user's Recall/NDCG@K from an evaluation's ``predictions.jsonl``.

    Returns:
      ``(rows [n_users], {"recall@K": [n_users], ...})`` in the file's order.
    """
    rows, hits, n_truth = [], [], []
    with open(predictions, encoding="utf-8") as f:
        for line in f:
            p = json.loads(line)
            truth = set(p["truth"])
            top = [int(i) in truth for i in p["top"][: max(ks)]]
            rows.append(int(p["row"]))
            hits.append(top + [False] * (max(ks) - len(top)))
            n_truth.append(len(truth))
    return np.asarray(rows), per_user_recall_ndcg(np.asarray(hits), np.asarray(n_truth), ks)


def per_user_losses(predictions: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, loss)`` of every evaluated user: the fine-tuned model's loss of the user's test
    target, as the evaluation recorded it (field ``loss`` of ``predictions.jsonl``)."""
    rows, losses = [], []
    with open(predictions, encoding="utf-8") as f:
        for line in f:
            p = json.loads(line)
            if "loss" not in p:
                raise UserError(
                    f"{predictions}: no per-user 'loss'; user groups need an "
                    "evaluation that records it"
                )
            rows.append(int(p["row"]))
            losses.append(float(p["loss"]))
    return np.asarray(rows), np.asarray(losses)


def loss_groups(losses: np.ndarray, n_groups: int = 3) -> np.ndarray:
    """The group of each user, 0 (lowest loss: easiest) .. ``n_groups - 1`` (hardest): equal
    sizes (differing by at most one user), ties kept in input order (paper Fig. 6)."""
    order = np.argsort(np.asarray(losses), kind="stable")
    groups = np.empty(len(order), dtype=np.int64)
    for g, part in enumerate(np.array_split(order, n_groups)):
        groups[part] = g
    return groups


def group_rows(
    rows: list[dict],
    keys: list[str],
    reference: str,
    n_groups: int,
    reference_seed: Literal["same", "next"] = "same",
    seeds: Sequence[int] = (),
) -> list[dict]:
    """Every run's metrics within each user group (paper Fig. 6) of a ``reference`` run at the
    same grid point (a run without its reference is left out).

    Args:
      rows: the finished runs (``method``, ``seed``, ``predictions``, the swept ``keys``).
      keys: the swept keys.
      reference: the method whose run's per-user test losses define the groups.
      n_groups: equal-sized groups, by :func:`loss_groups`.
      reference_seed: ``"same"``: the reference run of the run's own seed (the paper's rule);
        ``"next"``: of the next seed of ``seeds`` (cyclic), so no run is graded on the groups
        of its own model.
      seeds: the experiment's seeds, in order (for ``"next"``).
    Returns:
      rows with a ``group`` column (1 = easiest) and the metrics within that group.
    """
    if reference_seed == "next" and len(seeds) < 2:
        raise UserError("reference_seed 'next' needs at least 2 seeds")
    following = {s: seeds[(i + 1) % len(seeds)] for i, s in enumerate(seeds)}
    index = {(tuple(r[k] for k in keys), r["method"], r["seed"]): r for r in rows}
    out = []
    for r in rows:
        point = tuple(r[k] for k in keys)
        seed = following.get(r["seed"]) if reference_seed == "next" else r["seed"]
        ref = index.get((point, reference, seed))
        if ref is None:
            continue
        ref_users, ref_loss = run_user_losses(ref)
        where = {int(u): g for u, g in zip(ref_users, loss_groups(ref_loss, n_groups))}
        users, metrics = run_user_metrics(r)
        group = np.array([where[int(u)] for u in users])
        loss = _aligned_losses(r, users)
        for g in range(n_groups):
            mask = group == g
            out.append(
                {
                    **dict(zip(keys, point)),
                    "group": g + 1,
                    "method": r["method"],
                    "seed": r["seed"],
                    **{k: float(metrics[k][mask].mean()) for k in METRICS},
                    **({} if loss is None else {LOSS: float(loss[mask].mean())}),
                    "n_users": int(mask.sum()),
                    **{f"{s}_seconds": r[f"{s}_seconds"] for s in PER_RUN},
                }
            )
    return out


def _aligned_losses(row: dict, users: np.ndarray) -> np.ndarray | None:
    """The run's per-user test losses in the order of ``users``, or ``None`` when its
    evaluation recorded none (or for other users)."""
    try:
        loss_users, loss = run_user_losses(row)
    except (UserError, FileNotFoundError):
        return None
    return loss if np.array_equal(loss_users, users) else None


def cell_row(cell: Cell, d: Path, seconds: dict, key: str = "", record: Path | None = None) -> dict:
    """The results row of the finished run of ``cell`` in folder ``d``; ``key``: its reuse
    key (what an archive finds it by); ``record``: its fine-tune's ``train_record.json``, which
    gives the row's ``finetune_epochs`` and ``finetune_best_epoch`` (so an archive keeps them
    when the workdir is gone)."""
    metrics = json.loads((d / "metrics.json").read_text())
    flat = metrics.get("metrics", metrics)
    train = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    predictions = d / "metrics.predictions.jsonl"
    return {
        **dict(cell.point),
        "method": cell.method,
        "seed": cell.seed,
        **{k: float(flat[k]) for k in METRICS},
        **mean_test_loss(predictions),
        "n_users": int(flat.get("n_users", 0)),
        **{f"{s}_seconds": float(seconds.get(s, 0.0)) for s in PER_RUN},
        "finetune_epochs": len(train.get("epochs") or []),
        "finetune_best_epoch": int(train.get("best_epoch") or 0),
        "predictions": str(predictions),
        "key": key,
    }


def mean_test_loss(predictions: Path) -> dict:
    """``{"test_loss": mean}`` over the users of an evaluation's predictions (their recorded
    per-user loss of the test target), or ``{}`` when it recorded none."""
    try:
        _, losses = per_user_losses(predictions)
    except (UserError, FileNotFoundError):
        return {}
    return {LOSS: float(losses.mean())} if len(losses) else {}


def run_user_metrics(row: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(users, {metric: [n_users]})`` of a results row: from its run's predictions, or from
    the archive it was restored from (``_per_user``, :class:`jaxrec.archive.RunArchive`)."""
    if "_per_user" in row:
        users, metrics, _ = row["_per_user"]
        return users, metrics
    return per_user_metrics(Path(row["predictions"]))


def run_user_losses(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(users, loss)`` of a results row (see :func:`run_user_metrics`)."""
    if "_per_user" in row:
        users, _, loss = row["_per_user"]
        if loss is None:
            raise UserError(f"archived run {row['key']}: no per-user 'loss'")
        return users, loss
    return per_user_losses(Path(row["predictions"]))


def archive_run(archive: RunArchive, row: dict) -> None:
    """Add the finished run ``row`` to ``archive`` with its per-user metrics and (when its
    evaluation recorded them) test losses, and save the archive at once."""
    users, metrics = run_user_metrics(row)
    loss = _aligned_losses(row, users)
    if archive.add(row, users, metrics, loss):
        archive.save()
