"""Finished runs kept outside the workdir, small enough to commit (``experiment.archive``).

A workdir under ``runs/`` holds checkpoints and predictions and need not outlive the machine it
ran on; an archive holds only what the tables, the tests and the figures of
``dealrec experiment`` / ``dealrec report`` read, so it can go into the repository, and a later
``dealrec experiment`` takes a run found there as finished instead of running it again (and,
when every run it is asked for is archived, runs no shared stage either). An archive folder
holds:

* ``runs.csv``: one row per finished run: the columns of the experiment's ``runs.csv``
  (with ``finetune_epochs`` / ``finetune_best_epoch`` from the run's ``train_record.json``;
  absent in rows archived before 2026-12-06; ``test_loss``, the mean of the run's per-user
  ``loss``, absent in rows archived before 2026-12-07 and then computed from ``per_user.npz``
  by :meth:`RunArchive.row`) plus ``key``, the run's reuse key (the hash of
  every option its select, finetune and evaluate stages and the shared stages it reads ran
  with, see :func:`jaxrec.pipeline.stage_keys`);
* ``per_user.npz``: per run (arrays ``KEY.users``, ``KEY.recall@10``, ..., ``KEY.loss``), the
  evaluated users' rows, their Recall/NDCG@10/20 and, where the evaluation recorded it, their
  test loss: what the per-user tests and the user groups (paper Fig. 6) need. Plain float64 /
  int64 arrays (so tables and tests come out identical from an archive), read with
  ``allow_pickle=False``.

A run's key covers only the file names of its wired paths, not its workdir, so an archive serves
any workdir: ``dealrec experiment CONFIG --workdir ANY`` on a fresh clone finds every archived
run (the shipped TIGER configs' runs are archived in ``results/tiger_games``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from jaxrec.errors import UserError

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
LOSS = "test_loss"  # the mean of the per-user array ``loss`` (jaxrec.experiment.grid.LOSS)


class RunArchive:
    """The runs of one archive folder, read at construction; :meth:`add` then :meth:`save`.

    Args:
      folder: the archive folder (created on the first :meth:`save`).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.rows: dict[str, dict] = {}
        self.arrays: dict[str, np.ndarray] = {}
        table, npz = self.folder / "runs.csv", self.folder / "per_user.npz"
        if table.is_file():
            with open(table, newline="") as f:
                for row in csv.DictReader(f):
                    self.rows[row["key"]] = row
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as z:
                self.arrays = {name: z[name] for name in z.files}
        missing = [k for k in self.rows if f"{k}.users" not in self.arrays]
        if missing:
            raise UserError(f"{self.folder}: per_user.npz lacks the runs {missing[:3]} of runs.csv")

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def row(self, key: str, fields: dict) -> dict:
        """The archived run ``key`` as an experiment row: ``fields`` (the cell's method, seed
        and swept values, exactly typed) over the archived metrics and seconds (floats), with
        the per-user arrays under ``_per_user`` (see :func:`jaxrec.experiment.run_user_metrics`).
        """
        stored = self.rows[key]
        row = {}
        for name, value in stored.items():
            if name in fields or value == "":
                continue
            if name in METRICS or name == LOSS or name.endswith("_seconds"):
                row[name] = float(value)
            elif name in ("n_users", "finetune_epochs", "finetune_best_epoch"):
                row[name] = int(value)
            else:
                row[name] = value
        users = self.arrays[f"{key}.users"]
        metrics = {k: self.arrays[f"{key}.{k}"] for k in METRICS}
        loss = self.arrays.get(f"{key}.loss")
        if LOSS not in row and loss is not None and len(loss):
            row[LOSS] = float(loss.mean())  # a row archived before test_loss was a column
        return {**fields, **row, "key": key, "_per_user": (users, metrics, loss)}

    def add(self, row: dict, users: np.ndarray, metrics: dict, loss: np.ndarray | None) -> bool:
        """Keep run ``row`` (it has ``key``) with its per-user arrays; False if it is here."""
        key = row["key"]
        if key in self.rows:
            return False
        self.rows[key] = {k: v for k, v in row.items() if not k.startswith("_")}
        self.arrays[f"{key}.users"] = np.asarray(users, np.int64)
        for k in METRICS:
            self.arrays[f"{key}.{k}"] = np.asarray(metrics[k], np.float64)
        if loss is not None:
            self.arrays[f"{key}.loss"] = np.asarray(loss, np.float64)
        return True

    def save(self) -> None:
        """Write ``runs.csv`` and ``per_user.npz`` (each to a temporary file, then renamed, so
        a kill leaves the previous archive whole). Runs another process saved since this one
        read the folder (two experiments sharing an archive) are merged in, not overwritten."""
        if (self.folder / "runs.csv").is_file():
            on_disk = RunArchive(self.folder)
            for key in on_disk.rows.keys() - self.rows.keys():
                self.rows[key] = on_disk.rows[key]
                prefix = f"{key}."
                self.arrays.update(
                    {k: a for k, a in on_disk.arrays.items() if k.startswith(prefix)}
                )
        self.folder.mkdir(parents=True, exist_ok=True)
        fields: list[str] = []
        for row in self.rows.values():
            fields += [k for k in row if k not in fields]
        table = self.folder / "runs.csv"
        with open(table.with_suffix(".csv.tmp"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(self.rows.values())
        npz = self.folder / "per_user.npz"
        with open(npz.with_suffix(".npz.tmp"), "wb") as f:
            np.savez_compressed(f, **self.arrays)  # type: ignore[arg-type]  # numpy's stub
        os.replace(npz.with_suffix(".npz.tmp"), npz)
        os.replace(table.with_suffix(".csv.tmp"), table)


__all__ = ["RunArchive"]
