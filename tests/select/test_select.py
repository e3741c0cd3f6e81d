"""Selection core (NumPy only): hand-worked Algorithm 2, exactness, seeds, and the baselines."""

import math
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrec.errors import UserError
from jaxrec.select import (
    METHODS,
    ccs_beta,
    ccs_prune_count,
    kmeans,
    minmax,
    overall_scores,
    proportional_budgets,
    select,
    smallest_first_budgets,
    stratified_sample,
)

# Hand-worked example. influence and effort already span [0, 1], so min-max is the identity and
# overall = I + 0.5 E (lamda 0.5):
#   row      0    1    2    3    4    5    6    7    8     9    10   11
#   I        0   .1   .2   .3    1   .4   .5   .9  .65   .05   .7   .8
#   E        0   .2    0   .4    1   .2   .6   .8    0    .1   .2   .8
#   overall  0   .2   .2   .5  1.5   .5   .8  1.3  .65   .1   .8  1.2
# hard_prune .2 -> floor(2.4) = 2 pruned: rows 4 (1.5) and 7 (1.3). The pool spans [0, 1.2];
# K = 4 groups of width .3: (<=.3] rows 0 1 2 9 | (.3,.6] rows 3 5 | (.6,.9] rows 6 8 10 |
# (.9,1.2] row 11 -> sizes [4, 2, 3, 1].
# n = 6, groups by size: g3 (1): min(1, 6//4) = 1, left 5; g1 (2): min(2, 5//3) = 1, left 4;
# g2 (3): min(3, 4//2) = 2, left 2; g0 (4): min(4, 2//1) = 2 -> counts [2, 1, 2, 1].
# n = 8: g3 min(1, 2) = 1 (7 left); g1 min(2, 7//3) = 2 (5); g2 min(3, 5//2) = 2 (3); g0 3.
I = np.array([0, 0.1, 0.2, 0.3, 1, 0.4, 0.5, 0.9, 0.65, 0.05, 0.7, 0.8])
E = np.array([0, 0.2, 0, 0.4, 1, 0.2, 0.6, 0.8, 0, 0.1, 0.2, 0.8])
GROUPS = [{0, 1, 2, 9}, {3, 5}, {6, 8, 10}, {11}]


def test_overall_scores_eq13_hand_example():
    expect = [0, 0.2, 0.2, 0.5, 1.5, 0.5, 0.8, 1.3, 0.65, 0.1, 0.8, 1.2]
    np.testing.assert_allclose(overall_scores(I, E, 0.5), expect, atol=1e-12)
    # min-max really normalises: scaling and shifting the raw scores changes nothing
    np.testing.assert_allclose(overall_scores(3 * I - 7, 100 * E + 2, 0.5), expect, atol=1e-12)
    np.testing.assert_allclose(minmax([2.0, 4.0, 3.0]), [0, 1, 0.5])
    np.testing.assert_array_equal(minmax([5.0, 5.0]), [0, 0])  # constant -> zeros, no NaN


@pytest.mark.parametrize("n,counts", [(6, [2, 1, 2, 1]), (8, [3, 2, 2, 1])])
def test_dealrec_hand_worked_groups_and_budgets(n, counts):
    sel = select("dealrec", n, influence=I, effort=E, lamda=0.5, groups=4, hard_prune=0.2, seed=3)
    info = sel.info
    assert info["n_pruned"] == 2
    assert info["group_sizes"] == [4, 2, 3, 1]
    assert info["group_selected"] == counts
    np.testing.assert_allclose(info["edges"], [0, 0.3, 0.6, 0.9, 1.2], atol=1e-12)
    chosen = set(sel.indices.tolist())
    assert [len(chosen & g) for g in GROUPS] == counts
    assert not chosen & {4, 7}
    assert 11 in chosen


def test_score_on_an_edge_goes_to_the_lower_group():
    # edges 0 1 2 3 4: the paper's "s <= ref" puts 1 in group 0, 2 in group 1, ...
    sel = stratified_sample(np.arange(5.0), 5, groups=4, hard_prune=0.0)
    assert sel.info["group_sizes"] == [2, 1, 1, 1]
    assert sel.info["edges"] == [0, 1, 2, 3, 4]


def _paper_loop_counts(sizes, n):
    """The paper's prune.py loop, transcribed: counts per group (sampling left out)."""
    groups = [(g, s) for g, s in enumerate(sizes)]
    counts, m = [0] * len(sizes), n
    while groups:
        groups = [x for x in sorted(groups, key=lambda x: x[1]) if x[1]]
        if not groups:
            break
        budget = min(groups[0][1], math.floor(m / len(groups)))
        counts[groups[0][0]] = budget
        m -= budget
        groups = groups[1:]
    return counts


def test_budget_rule_matches_paper_loop_and_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(1, 12))
        sizes = rng.integers(0, 30, size=k) * (rng.random(k) < 0.8)
        if sizes.sum() == 0:
            continue
        n = int(rng.integers(1, sizes.sum() + 1))
        counts = smallest_first_budgets(sizes, n)
        assert counts.tolist() == _paper_loop_counts(sizes.tolist(), n)
        assert counts.sum() == n and (counts <= sizes).all()


def test_exact_distinct_reproducible_and_never_pruned():
    rng = np.random.default_rng(1)
    for trial in range(50):
        size = int(rng.integers(20, 400))
        scores = rng.standard_normal(size) ** 3  # skewed: many sparse strata
        prune = float(rng.uniform(0, 0.5))
        n_pruned = int(np.floor(prune * size))
        n = int(rng.integers(1, size - n_pruned + 1))
        k = int(rng.integers(1, 60))
        a = stratified_sample(scores, n, groups=k, hard_prune=prune, seed=trial)
        b = stratified_sample(scores, n, groups=k, hard_prune=prune, seed=trial)
        assert a.indices.dtype == np.int64 and a.indices.size == n
        assert np.unique(a.indices).size == n
        np.testing.assert_array_equal(a.indices, b.indices)
        pruned = np.argsort(-scores, kind="stable")[:n_pruned]
        assert not np.isin(a.indices, pruned).any()
        assert sum(a.info["group_sizes"]) == size - n_pruned
        assert sum(a.info["group_selected"]) == n


def test_seed_changes_the_sample_and_ties_at_the_prune_line():
    scores = np.zeros(100)
    a = stratified_sample(scores, 10, groups=5, hard_prune=0.1, seed=0)
    b = stratified_sample(scores, 10, groups=5, hard_prune=0.1, seed=1)
    assert not np.array_equal(a.indices, b.indices)
    assert a.info["group_sizes"] == [90, 0, 0, 0, 0]  # constant scores: one group
    assert a.indices.min() >= 10  # ties: lower rows are pruned first


def test_bad_arguments_raise_user_error():
    s = np.arange(10.0)
    for kwargs in (
        {"n": 0},
        {"n": 11},
        {"n": 3, "groups": 0},
        {"n": 3, "hard_prune": 1.0},
        {"n": 10, "hard_prune": 0.1},
    ):
        with pytest.raises(UserError):
            stratified_sample(s, **kwargs)
    with pytest.raises(UserError, match="non-finite"):
        stratified_sample(np.array([1.0, np.nan, 2.0]), 1)
    with pytest.raises(UserError, match="unknown method"):
        select("best", 3, n_total=10)
    with pytest.raises(UserError, match="needs effort"):
        select("dealrec", 3, influence=s)
    with pytest.raises(UserError, match="disagree"):
        select("dealrec", 3, influence=s, effort=np.arange(9.0))


def test_selecting_1024_of_49156_is_fast():
    rng = np.random.default_rng(0)
    infl, eff = rng.standard_normal(49_156), rng.gamma(2.0, size=49_156)
    select("dealrec", 1024, influence=infl, effort=eff)  # warm up
    t0 = time.perf_counter()
    sel = select(
        "dealrec", 1024, influence=infl, effort=eff, lamda=0.3, groups=50, hard_prune=0.1, seed=0
    )
    seconds = time.perf_counter() - t0
    print(f"dealrec 1024 of 49156: {seconds * 1e3:.1f} ms")
    assert sel.indices.size == 1024 and np.unique(sel.indices).size == 1024
    assert seconds < 1.0


# ----------------------------------------------------------------------------- baselines
def test_random_grand_el2n_greedy():
    a = select("random", 5, n_total=50, seed=7)
    assert a.indices.size == 5 and np.unique(a.indices).size == 5
    np.testing.assert_array_equal(a.indices, select("random", 5, n_total=50, seed=7).indices)
    g = np.array([0.3, 5.0, 0.1, 2.0, 2.0, 9.0])
    np.testing.assert_array_equal(select("grand", 3, grand=g).indices, [1, 3, 5])
    np.testing.assert_array_equal(select("el2n", 2, el2n=-g).indices, [0, 2])
    # greedy = top n by overall (no pruning): rows 4 (1.5), 7 (1.3), 11 (1.2)
    np.testing.assert_array_equal(
        select("greedy", 3, influence=I, effort=E, lamda=0.5).indices, [4, 7, 11]
    )


def test_ablations_use_one_score_only():
    rng = np.random.default_rng(2)
    infl, eff = rng.standard_normal(200), rng.standard_normal(200)
    kw = dict(groups=7, hard_prune=0.1, seed=4)
    a = select("influence-only", 20, influence=infl, **kw)
    np.testing.assert_array_equal(a.indices, stratified_sample(infl, 20, **kw).indices)
    b = select("effort-only", 20, effort=eff, **kw)
    np.testing.assert_array_equal(b.indices, stratified_sample(eff, 20, **kw).indices)
    # dealrec with lamda 0 is influence-only
    c = select("dealrec", 20, influence=infl, effort=eff, lamda=0.0, **kw)
    np.testing.assert_array_equal(a.indices, c.indices)


def test_ccs_prunes_hardest_beta_then_stratifies():
    rng = np.random.default_rng(3)
    el2n = rng.random(300)
    sel = select("ccs", 40, el2n=el2n, beta=0.2, groups=10, seed=0)
    hardest = np.argsort(-el2n)[:60]
    assert sel.indices.size == 40 and not np.isin(sel.indices, hardest).any()
    assert sel.info["n_pruned"] == 60 and sum(sel.info["group_selected"]) == 40


def test_ccs_beta_from_the_pruning_rate_hand_worked():
    # beta = max(0, (1 - n/N) - 0.6): the line through the CCS README's 0.2 at r = 0.8 and 0.3 at
    # r = 0.9; counts are exact (0.4 N - n), with no float round-off at 70 %
    assert ccs_prune_count(2, 20) == 6 and ccs_beta(2, 20) == 0.3  # r = 0.9
    assert ccs_prune_count(4, 20) == 4 and ccs_beta(4, 20) == 0.2  # r = 0.8
    assert ccs_prune_count(30, 100) == 10  # r = 0.7: 0.7 - 0.6 in floats is 0.0999..
    assert ccs_prune_count(10, 20) == 0 and ccs_beta(10, 20) == 0.0  # r = 0.5
    assert ccs_prune_count(1, 100) == 39  # r = 0.99
    # N = 20 users with EL2N 0..19 (shuffled rows), keep n = 2 (r = 0.9): the 6 hardest (EL2N
    # 14..19) go; the pool 0..13 splits into 2 equal-width strata [0, 6.5] and (6.5, 13] of 7
    # users each, and each stratum gets one of the 2 places.
    rows = np.random.default_rng(0).permutation(20)
    el2n = np.empty(20)
    el2n[rows] = np.arange(20.0)
    for seed in range(5):
        sel = select("ccs", 2, el2n=el2n, groups=2, seed=seed)
        picked = np.sort(el2n[sel.indices])
        assert picked[0] <= 6 and 7 <= picked[1] <= 13
        assert sel.info["beta_rule"] == "rate" and sel.info["beta"] == 0.3
        assert sel.info["n_pruned"] == 6 and sel.info["prune_threshold"] == 14.0
        assert sel.info["group_sizes"] == [7, 7] and sel.info["group_selected"] == [1, 1]
    # a fixed beta overrides the rule
    fixed = select("ccs", 2, el2n=el2n, groups=2, beta=0.0, seed=0)
    assert fixed.info["n_pruned"] == 0 and fixed.info["beta_rule"] == "fixed"


def _blobs(sizes, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = 20.0 * np.eye(len(sizes), dim)
    x = np.concatenate([c + rng.standard_normal((s, dim)) for c, s in zip(centres, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, truth = _blobs([30, 70, 50])
    labels, centres, stats = kmeans(x, 3, seed=0)
    # each found cluster is exactly one true blob
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    inertia = sum(((x[truth == j] - x[truth == j].mean(0)) ** 2).sum() for j in range(3))
    assert stats["inertia"] == pytest.approx(inertia)
    np.testing.assert_array_equal(labels, kmeans(x, 3, seed=0)[0])


def test_tfdcon_spreads_budget_over_clusters():
    x, truth = _blobs([5, 50, 100], seed=1)
    # smallest first: 5 -> min(5, 30//3) = 5; 50 -> min(50, 25//2) = 12; 100 -> 13
    sel = select("tfdcon", 30, representations=x, clusters=3, seed=0)
    assert np.bincount(truth[sel.indices], minlength=3).tolist() == [5, 12, 13]
    assert sorted(sel.info["cluster_sizes"]) == [5, 50, 100]
    # LLM representations join the features; identical blobs there keep the same clusters
    both = select("tfdcon", 30, representations=x, llm_representations=x[:, ::-1], clusters=3)
    assert np.bincount(truth[both.indices], minlength=3).tolist() == [5, 12, 13]


def test_recranker_proportional_and_favours_active_users():
    assert proportional_budgets([20, 80], 10).tolist() == [2, 8]
    assert proportional_budgets([1, 1, 1], 2).tolist() == [1, 1, 0]
    x, truth = _blobs([50, 150], seed=2)
    inter = np.where(np.arange(200) % 2 == 0, 1, 60)  # odd rows are heavy users
    heavy = []
    for seed in range(100):
        sel = select("recranker", 20, representations=x, interactions=inter, clusters=2, seed=seed)
        assert np.bincount(truth[sel.indices], minlength=2).tolist() == [5, 15]
        heavy.append(np.mean(sel.indices % 2 == 1))
    # draw weight log(61) vs log(2): about 0.86 of single draws are heavy users
    assert np.mean(heavy) > 0.75


def test_every_method_is_exact():
    rng = np.random.default_rng(5)
    size = 300
    inputs = dict(
        influence=rng.standard_normal(size),
        effort=rng.random(size),
        grand=rng.random(size),
        el2n=rng.random(size),
        representations=rng.standard_normal((size, 8)),
        interactions=rng.integers(1, 40, size),
    )
    for method in [m for m in METHODS if m != "all"]:  # "all" ignores n (tested below)
        sel = select(method, 37, clusters=6, groups=9, seed=1, **inputs)
        assert sel.indices.size == 37 and np.unique(sel.indices).size == 37, method
        assert sel.indices.dtype == np.int64 and np.all(np.diff(sel.indices) > 0), method


def test_core_does_not_import_jax():
    code = (
        "import sys, jaxrec.select, jaxrec.select.cli; "
        "bad = [m for m in ('jax', 'flax', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_selects_every_user_whatever_n():
    from jaxrec.select import select

    assert select("all", 3, n_total=6).indices.tolist() == [0, 1, 2, 3, 4, 5]
