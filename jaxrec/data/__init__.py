"""The NumPy-only data layer shared by both sides: datasets, synthetic data, score files."""

from jaxrec.data.dataset import (
    MAX_LEN,
    Dataset,
    evaluation_arrays,
    history,
    left_pad,
    load_dataset,
    training_arrays,
)
from jaxrec.data.scorefiles import load_scores, read_manifest, save_scores, write_json

__all__ = [
    "MAX_LEN",
    "Dataset",
    "evaluation_arrays",
    "history",
    "left_pad",
    "load_dataset",
    "training_arrays",
    "load_scores",
    "read_manifest",
    "save_scores",
    "write_json",
]
