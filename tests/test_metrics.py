"""Full-ranking metrics against a plain-Python reference on a hand-made case."""

import math

import numpy as np

from jaxrec.data.ranking import recall_ndcg
from jaxrec.metrics import mask_seen, topk_metrics


def reference(scores, seen, truth, k):
    """Plain Python: rank items (column 0 and seen masked), Recall@k and NDCG@k per user."""
    recalls, ndcgs = [], []
    for row, s, t in zip(scores, seen, truth):
        t = {x for x in t if x}
        if not t:
            continue
        order = sorted((i for i in range(1, len(row)) if i not in set(s)), key=lambda i: -row[i])
        top = order[:k]
        hits = [1 if i in t else 0 for i in top]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(t), k)))
        recalls.append(sum(hits) / len(t))
        ndcgs.append(dcg / idcg)
    return np.mean(recalls), np.mean(ndcgs)


def test_hand_worked_example():
    # 1 user, 5 items; scores rank items 5 > 4 > 3 > 2 > 1; item 5 seen -> ranking 4, 3, 2, 1.
    scores = np.array([[9.0, 1, 2, 3, 4, 5]], np.float32)
    seen = np.array([[5]])
    truth = np.array([[3, 1]])
    hits, n_truth = topk_metrics(mask_seen(scores, seen), truth, 4)
    np.testing.assert_array_equal(np.asarray(hits), [[False, True, False, True]])
    m = recall_ndcg(np.asarray(hits)[:, :2], n_truth, ks=(2,))
    # top-2 = [4, 3]: one hit of two -> recall 0.5; DCG = 1/log2(3); IDCG = 1 + 1/log2(3)
    assert math.isclose(m["recall@2"], 0.5)
    assert math.isclose(m["ndcg@2"], (1 / math.log2(3)) / (1 + 1 / math.log2(3)), rel_tol=1e-6)


def test_random_against_reference():
    rng = np.random.default_rng(0)
    n_items, k = 40, 10
    scores = rng.normal(size=(25, n_items + 1)).astype(np.float32)
    seen = rng.integers(0, n_items + 1, size=(25, 6))
    truth = rng.integers(0, n_items + 1, size=(25, 3))
    truth[3] = 0  # a user with an empty split is skipped
    hits, n_truth = topk_metrics(mask_seen(scores, seen), truth, k)
    # duplicates in truth rows: the reference counts distinct items
    truth_sets = [sorted({x for x in t if x}) for t in truth]
    n_truth = np.array([len(t) for t in truth_sets])
    ours = recall_ndcg(np.asarray(hits), n_truth, ks=(k,))
    want = reference(scores, seen, [t or [0] for t in truth_sets], k)
    assert math.isclose(ours[f"recall@{k}"], want[0], rel_tol=1e-6)
    assert math.isclose(ours[f"ndcg@{k}"], want[1], rel_tol=1e-6)
