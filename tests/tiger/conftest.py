"""Fixtures of the TIGER tests."""

import numpy as np
import pytest

from jaxrec.data import load_dataset, save_scores
from jaxrec.data.synthetic import make_synthetic
from tests.support import random_codes, write_codes


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A 120-user, 40-item synthetic dataset, its codes file and a 48-user selection."""
    root = tmp_path_factory.mktemp("tiger")
    path = make_synthetic(root / "data", n_users=120, n_items=40, n_clusters=4, max_len=8, seed=3)
    ds = load_dataset(path)
    sizes = [4, 4, 3, 2]
    codes = random_codes(ds.n_items, sizes, seed=1)
    write_codes(root / "codes.npy", ds, codes, sizes)
    sel = np.random.default_rng(0).choice(ds.n_users, 48, replace=False)
    save_scores(root / "sel.npy", sel, kind="selection", dataset=ds.fingerprint())
    return root, path, ds, codes, sizes
