"""The experiment runner's pieces that need no model: per-user metrics (hand-worked), the sweep
grid and its checks, and the per-user paired tests."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxrec.data.ranking import per_user_recall_ndcg, recall_ndcg
from jaxrec.errors import UserError
from jaxrec.experiment import (
    Cell,
    ExperimentArgs,
    ExperimentConfig,
    check_sweep,
    experiment_cells,
    group_rows,
    loss_groups,
    per_user_metrics,
    run_folder,
    selected_cells,
    user_tests,
)


def test_per_user_metrics_hand_worked():
    # user 0: truth {a, b}, hits at ranks 1 and 3; user 1: one truth item at rank 2.
    hits = np.zeros((2, 20), bool)
    hits[0, [0, 2]] = True
    hits[1, 1] = True
    got = per_user_recall_ndcg(hits, np.array([2, 1]), ks=(10,))
    np.testing.assert_allclose(got["recall@10"], [1.0, 1.0])
    ndcg0 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    np.testing.assert_allclose(got["ndcg@10"], [ndcg0, 1 / np.log2(3)])
    means = recall_ndcg(hits, np.array([2, 1]), ks=(10,))
    assert means["ndcg@10"] == pytest.approx((ndcg0 + 1 / np.log2(3)) / 2)


def test_per_user_metrics_from_predictions(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"row": 5, "top": [3, 1, 2], "truth": [1]}, {"row": 2, "top": [4], "truth": [9, 8]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows, m = per_user_metrics(path)
    assert rows.tolist() == [5, 2]
    np.testing.assert_allclose(m["recall@20"], [1.0, 0.0])
    np.testing.assert_allclose(m["ndcg@20"], [1 / np.log2(3), 0.0])


def test_sweep_grid_and_names():
    points = check_sweep({"select.n": [8, 16], "select.lamda": [0.1, 0.3]}, {}, "cfg")
    assert len(points) == 4 and points[0] == (("select.n", 8), ("select.lamda", 0.1))
    assert Cell("dealrec", 1, points[3]).name == "dealrec-seed1-select.n=16-select.lamda=0.3"
    assert check_sweep({}, {}, "cfg") == [()]


def test_a_point_at_the_configs_own_value_is_the_unswept_run():
    wired = {"select": {"lamda": 0.5}}  # groups: the default, 50
    point = (("select.lamda", 0.5), ("select.groups", 50))
    assert run_folder(Cell("dealrec", 2, point), wired) == "dealrec-seed2"
    point = (("select.lamda", 1.0), ("select.groups", 50))
    assert run_folder(Cell("dealrec", 2, point), wired) == "dealrec-seed2-select.lamda=1.0"
    point = (("select.lamda", 0.5), ("select.groups", 25))
    assert run_folder(Cell("dealrec", 2, point), wired) == "dealrec-seed2-select.groups=25"
    assert run_folder(Cell("random", 0), wired) == "random-seed0"


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"select.nn": [1]}, "unknown key 'nn'"),
        ({"select.n": ["many"]}, "n must be int"),
        ({"surrogate.epochs": [1]}, "cannot sweep 'surrogate.epochs'"),
        ({"select.n": []}, "non-empty list"),
    ],
)
def test_sweep_errors(sweep, message):
    with pytest.raises(UserError, match=message):
        check_sweep(sweep, {}, "cfg")


def test_points_methods_seeds_choose_the_cells_to_run_now():
    sweep = {"select.n": [8, 16, 32], "select.lamda": [0.1, 0.3]}
    exp = ExperimentConfig(methods=["random", "dealrec"], seeds=[0, 1], sweep=sweep)
    cells = experiment_cells(exp, check_sweep(sweep, {}, "cfg"))
    assert len(cells) == 24
    args = ExperimentArgs(config="cfg", points=["select.n=8", "select.n=32"], seeds=[1])
    now = selected_cells(cells, args, sweep)
    assert len(now) == 2 * 2 * 2  # n in {8, 32} x both lamdas x both methods, seed 1
    assert {dict(c.point)["select.n"] for c in now} == {8, 32} and {c.seed for c in now} == {1}
    args = ExperimentArgs(config="cfg", points=["select.lamda=0.3"], methods=["dealrec"])
    now = selected_cells(cells, args, sweep)
    assert [c.name for c in now][:1] == ["dealrec-seed0-select.n=8-select.lamda=0.3"]
    assert len(now) == 3 * 2
    assert selected_cells(cells, ExperimentArgs(config="cfg"), sweep) == cells


@pytest.mark.parametrize(
    "points, message",
    [
        (["select.n"], "is not KEY=VALUE"),
        (["select.lamda=0.1"], "is not KEY=VALUE with KEY a swept key"),
        (["select.n=64"], "64 is not in the config's sweep select.n"),
    ],
)
def test_points_errors(points, message):
    sweep = {"select.n": [8, 16]}
    cells = experiment_cells(ExperimentConfig(sweep=sweep), check_sweep(sweep, {}, "cfg"))
    with pytest.raises(UserError, match=message):
        selected_cells(cells, ExperimentArgs(config="cfg", points=points), sweep)


def _run(tmp_path, name, method, seed, per_user_hits):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(
        "".join(
            json.dumps({"row": r, "top": [1] if hit else [2], "truth": [1]}) + "\n"
            for r, hit in enumerate(per_user_hits)
        )
    )
    return {"method": method, "seed": seed, "predictions": str(path)}


def _two_methods(tmp_path, n=40):
    """Runs of random (hits for 10 and 10 of ``n`` users, seeds 0 and 1) and dealrec (30, 20)."""
    return [
        _run(tmp_path, "r0", "random", 0, [u < 10 for u in range(n)]),
        _run(tmp_path, "r1", "random", 1, [u < 10 for u in range(n)]),
        _run(tmp_path, "d0", "dealrec", 0, [u < 30 for u in range(n)]),
        _run(tmp_path, "d1", "dealrec", 1, [u < 20 for u in range(n)]),
    ]


def test_user_tests_pair_users_over_seeds(tmp_path):
    n = 40
    rows = _two_methods(tmp_path, n)
    (t,) = [t for t in user_tests(rows, ["random", "dealrec"]) if t["metric"] == "recall@10"]
    assert t["n_users"] == n and t["seeds"] == 2
    assert t["baseline"] == "random" and t["baseline_mean"] == pytest.approx(0.25)
    assert t["mean"] == pytest.approx(25 / 40)
    assert t["better"] == 20 and t["worse"] == 0 and t["p_wilcoxon"] < 1e-3


def test_tests_against_another_baseline(tmp_path):
    """experiment.baseline: the paper's Fig. 4 tests each ablation against dealrec; every
    number is then the same test with the roles swapped (a hand-worked example: per-seed
    hits 10 / 10 users for random, 30 / 20 for dealrec, out of 40)."""
    from jaxrec.experiment import summarise

    n = 40
    rows = _two_methods(tmp_path, n)
    for r, hits in zip(rows, (10, 10, 30, 20)):
        r.update({k: hits / n for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")})
        r.update({f"{s}_seconds": 1.0 for s in ("select", "finetune", "evaluate")})
    methods = ["random", "dealrec"]
    (u,) = [t for t in user_tests(rows, methods, baseline="dealrec") if t["metric"] == "recall@10"]
    assert u["method"] == "random" and u["baseline"] == "dealrec"
    assert u["mean"] == pytest.approx(0.25) and u["baseline_mean"] == pytest.approx(25 / 40)
    assert u["better"] == 0 and u["worse"] == 20
    _, tests = summarise(rows, methods, baseline="dealrec")
    (t,) = [t for t in tests if t["metric"] == "recall@10"]
    # random - dealrec per seed: (10 - 30) / 40 and (10 - 20) / 40; Welch's test over the
    # seeds of each arm (not paired by seed)
    assert t["method"] == "random" and t["runs"] == 2 and t["baseline_runs"] == 2
    assert t["mean_diff"] == pytest.approx(-15 / 40)
    _, default = summarise(rows, methods)
    (d,) = [t for t in default if t["metric"] == "recall@10"]
    assert d["method"] == "dealrec" and d["mean_diff"] == pytest.approx(15 / 40)
    assert d["p"] == pytest.approx(t["p"])


def test_loss_groups_partition_equal_and_ordered():
    rng = np.random.default_rng(0)
    losses = rng.random(31)
    groups = loss_groups(losses, 3)
    sizes = np.bincount(groups)
    assert sizes.sum() == 31 and sizes.max() - sizes.min() <= 1 and len(sizes) == 3
    assert losses[groups == 0].max() <= losses[groups == 1].min()
    assert losses[groups == 1].max() <= losses[groups == 2].min()


def test_group_rows_use_the_reference_runs_groups(tmp_path):
    def run(name, method, hits, losses):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"row": r, "top": [1] if h else [2], "truth": [1], "loss": l}) + "\n"
                for r, (h, l) in enumerate(zip(hits, losses))
            )
        )
        return {
            "method": method,
            "seed": 0,
            "predictions": str(path),
            "select_seconds": 0,
            "finetune_seconds": 0,
            "evaluate_seconds": 0,
        }

    # random's losses put users 3,4,5 in the easiest group; dealrec hits exactly users 0,1,2
    ref = run("r", "random", [1, 0, 0, 1, 1, 1], [9, 8, 7, 1, 2, 3])
    other = run("d", "dealrec", [1, 1, 1, 0, 0, 0], [0] * 6)
    rows = group_rows([ref, other], [], "random", 2)
    got = {(r["method"], r["group"]): r["recall@10"] for r in rows}
    assert got == {
        ("random", 1): 1.0,
        ("random", 2): 1 / 3,
        ("dealrec", 1): 0.0,
        ("dealrec", 2): 1.0,
    }


def test_group_rows_next_seed_reference(tmp_path):
    def run(name, method, seed, hits, losses):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"row": r, "top": [1] if h else [2], "truth": [1], "loss": l}) + "\n"
                for r, (h, l) in enumerate(zip(hits, losses))
            )
        )
        seconds = {f"{s}_seconds": 0 for s in ("select", "finetune", "evaluate")}
        return {"method": method, "seed": seed, "predictions": str(path), **seconds}

    # seed 0's random run: users 0-2 easiest; seed 1's: users 3-5 easiest
    r0 = run("r0", "random", 0, [1, 1, 0, 0, 0, 0], [1, 2, 3, 7, 8, 9])
    r1 = run("r1", "random", 1, [0, 0, 0, 1, 0, 0], [9, 8, 7, 1, 2, 3])
    d0 = run("d0", "dealrec", 0, [0, 0, 0, 1, 1, 1], [0] * 6)
    rows = group_rows([r0, r1, d0], [], "random", 2, "next", [0, 1])
    got = {(r["method"], r["seed"], r["group"]): r["recall@10"] for r in rows}
    assert got == {  # seed 0's runs graded on seed 1's groups and the other way round
        ("random", 0, 1): 0.0,
        ("random", 0, 2): 2 / 3,
        ("random", 1, 1): 0.0,
        ("random", 1, 2): 1 / 3,
        ("dealrec", 0, 1): 1.0,
        ("dealrec", 0, 2): 0.0,
    }
    with pytest.raises(UserError, match="at least 2 seeds"):
        group_rows([r0], [], "random", 2, "next", [0])


def test_figures_from_a_sweep_and_groups(tmp_path):
    from jaxrec.experiment import summarise, write_csv
    from jaxrec.figures import experiment_figures, read_table

    rows = []
    for n in (8, 16):
        for method in ("random", "dealrec", "all"):
            for seed in (0, 1):
                rows.append(
                    {
                        "select.n": n,
                        "method": method,
                        "seed": seed,
                        **{
                            k: 0.01 * n + seed * 0.001
                            for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
                        },
                        "select_seconds": 1,
                        "finetune_seconds": n,
                        "evaluate_seconds": 2,
                    }
                )
    table, _ = summarise(rows, ["random", "dealrec", "all"], ["select.n"])
    write_csv(tmp_path / "results.csv", table)
    groups = [dict(r, group=g) for r in table for g in (1, 2, 3)]
    write_csv(tmp_path / "groups.csv", groups)
    (tmp_path / "experiment.json").write_text(json.dumps({"sweep": {"select.n": [8, 16]}}))
    assert read_table(tmp_path / "results.csv")[0]["recall@20_mean"] == pytest.approx(0.0805)
    written = experiment_figures(tmp_path)
    assert {p.name for p in written} == {"sweep_select.n.png", "groups.png"}
    assert all(p.stat().st_size > 5000 for p in written)


def test_baseline_must_be_one_of_the_methods(tmp_path):
    from jaxrec.experiment import baseline_of, read_experiment

    path = tmp_path / "exp.yaml"
    path.write_text("experiment:\n  methods: [random, greedy]\n  seeds: [0]\n  baseline: dealrec\n")
    with pytest.raises(UserError, match="baseline 'dealrec' is not one of the methods"):
        read_experiment(ExperimentArgs(config=str(path)))
    # by default random is the baseline where it runs; a study without it has no tests
    path.write_text("experiment:\n  methods: [dealrec]\n  seeds: [0]\n")
    _, exp, _ = read_experiment(ExperimentArgs(config=str(path)))
    assert exp.baseline == "" and baseline_of(exp) == "random"


def test_one_run_has_no_std_in_tables():
    from jaxrec.experiment import mean_std

    row = {"runs": 1, "recall@20_mean": 0.03532, "recall@20_std": 0.0}
    assert mean_std(row, "recall@20") == "0.0353"
    assert mean_std({**row, "runs": 3, "recall@20_std": 0.0021}, "recall@20") == "0.0353 ± 0.0021"


def test_full_table_time_ratio_by_hand():
    """Table 3: each method's fine-tune seconds over the full fine-tune's (method all)."""
    from jaxrec.experiment import summarise
    from jaxrec.figures import full_table

    metrics = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
    rows = [
        {
            "method": m,
            "seed": 0,
            **{k: acc for k in metrics},
            "select_seconds": 1.0,
            "finetune_seconds": sec,
            "evaluate_seconds": 2.0,
        }
        for m, acc, sec in (("all", 0.04, 9600.0), ("dealrec", 0.01, 168.0))
    ]
    table, _ = summarise(rows, ["all", "dealrec"])
    lines = full_table(table).splitlines()
    assert lines[2] == "| all | 0.0400 | 0.0400 | 0.0400 | 0.0400 | 9600 | 1.000 |"
    assert (
        lines[3] == "| dealrec | 0.0100 | 0.0100 | 0.0100 | 0.0100 | 168 | 0.018 |"
    )  # 168 / 9600 = 0.0175


def test_two_processes_sharing_an_archive_keep_both_runs(tmp_path):
    """Two experiments read the same archive, then each saves its own run: neither is lost."""
    from jaxrec.archive import METRICS, RunArchive

    first, second = RunArchive(tmp_path), RunArchive(tmp_path)  # both read an empty folder
    users = np.arange(3)
    for archive, key, value in ((first, "aaa", 0.1), (second, "bbb", 0.2)):
        metrics = {k: np.full(3, value) for k in METRICS}
        archive.add({"key": key, "method": "dealrec", "recall@20": value}, users, metrics, None)
        archive.save()
    merged = RunArchive(tmp_path)
    assert set(merged.rows) == {"aaa", "bbb"}
    assert merged.arrays["aaa.recall@20"].tolist() == [0.1] * 3
    assert merged.arrays["bbb.recall@20"].tolist() == [0.2] * 3


def test_a_run_keys_only_the_shared_stages_it_reads():
    """Random reads no score: its runs keep their key when the influence options change;
    DEALRec reads the surrogate, influence and effort; TIGER runs read the semantic IDs."""
    from jaxrec.experiment import shared_reads
    from jaxrec.pipeline import PipelineConfig

    tiger = PipelineConfig(backend="tiger")
    assert shared_reads(tiger, "random", False) == ["semantic_ids"]
    assert shared_reads(tiger, "dealrec", False) == [
        "surrogate",
        "influence",
        "semantic_ids",
        "effort",
    ]
    assert shared_reads(PipelineConfig(backend="bigrec"), "grand", False) == ["surrogate"]
    assert shared_reads(PipelineConfig(backend="bigrec"), "tfdcon", True) == [
        "surrogate",
        "user_reps",
    ]


def test_reuse_keys_do_not_depend_on_the_workdir(tmp_path):
    """The same options wired under two workdirs give the same keys, so an archived run is
    found whatever ``--workdir`` is given; another option gives another key."""
    from jaxrec.pipeline import STAGES, stage_keys, wire

    def keys(workdir, n=1024):
        wired = wire({"select": {"n": n}}, workdir, "../shared/data/games", "tiger")
        return stage_keys(list(STAGES), wired)

    assert keys(tmp_path / "a") == keys(tmp_path / "elsewhere" / "b")
    assert keys(tmp_path / "a")["select"] != keys(tmp_path / "a", n=512)["select"]


def test_archived_runs_keep_their_keys():
    """The reuse key of an archived run of ``configs/studies/seeds30_tiger.yaml``, recomputed by
    today's code, is the key it was archived under: a change that moved it would silently
    rerun hours of committed runs (options added later are declared ``since``)."""
    import csv

    from jaxrec.experiment import (
        PER_RUN,
        ExperimentArgs,
        read_experiment,
        shared_reads,
        wire_cell,
    )
    from jaxrec.pipeline import baseline_score_options, digest, key_options, stage_keys, wire

    from tests.support import ROOT as root

    archived = {r["key"] for r in csv.DictReader(open(root / "results/tiger_games/runs.csv"))}
    # runs archived by the pinned clones of 2026-12-07 (random: 34e6704, DEALRec: 5ac7c44)
    known = {
        ("random", 0): "9ba9f1608fab089e",
        ("random", 1): "6f8a3e2307a5a4b6",
        ("dealrec", 0): "576cc3069bff0f09",
        ("dealrec", 5): "f0499471926ada55",
    }
    assert set(known.values()) <= archived
    args = ExperimentArgs(config=str(root / "configs/studies/seeds30_tiger.yaml"))
    data, exp, cells = read_experiment(args)
    pipe = data["pipeline"]
    wired = wire(data, Path("/anywhere"), pipe.data, pipe.backend)
    for cell in cells:
        if (cell.method, cell.seed) not in known:
            continue
        reads = shared_reads(pipe, cell.method, False)
        upstream = digest(
            [key_options(s, wired[s]) for s in reads] + baseline_score_options(wired, cell.method)
        )
        _, w = wire_cell(wired, Path("/anywhere"), cell)
        assert stage_keys(list(PER_RUN), w, upstream)["evaluate"] == known[cell.method, cell.seed]


# ------------------------------------------------------------------ seed-level statistics
def test_welch_against_scipy_and_by_hand():
    """Welch's t over seeds: the standard error and the Welch-Satterthwaite degrees of freedom
    worked by hand, t and p against scipy's ttest_ind(equal_var=False), the interval by the t
    quantile."""
    from scipy import stats

    from jaxrec.experiment.stats import welch

    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0])
    got = welch(a, b)
    # s_a^2 / n_a = (5/3) / 4 = 5/12, s_b^2 / n_b = 4 / 3: se^2 = 1.75
    assert got["mean_diff"] == pytest.approx(-1.5)
    assert got["se"] == pytest.approx(1.75**0.5)
    df = 1.75**2 / ((5 / 12) ** 2 / 3 + (4 / 3) ** 2 / 2)
    assert got["df"] == pytest.approx(df) and df == pytest.approx(3.23472, abs=1e-5)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert got["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    half = stats.t.ppf(0.975, df) * 1.75**0.5
    assert (got["lo"], got["hi"]) == pytest.approx((-1.5 - half, -1.5 + half))
    assert got["lo"] < 0 < got["hi"] and got["p"] > 0.05  # the interval holds 0 iff p > 0.05
    lo, hi = ref.confidence_interval(0.95)
    assert (got["lo"], got["hi"]) == pytest.approx((lo, hi), rel=1e-10)


def test_t_interval_and_mdd_by_hand():
    """A t-interval with the textbook quantile t(0.975, 4) = 2.776445; the minimum detectable
    difference (t(0.975, df) + t(0.80, df)) * se with t(0.975, 10) = 2.228139,
    t(0.80, 10) = 0.879058 and the normal limits 1.959964 + 0.841621."""
    from jaxrec.experiment.stats import mdd, t_interval

    mean, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # s = sqrt(2.5), se = sqrt(0.5)
    assert mean == 3.0
    half = 2.776445 * 0.5**0.5
    assert (lo, hi) == pytest.approx((3 - half, 3 + half), rel=1e-6)
    assert t_interval([0.5])[0] == 0.5 and np.isnan(t_interval([0.5])[1])
    assert mdd(1.0, 10) == pytest.approx(2.228139 + 0.879058, rel=1e-6)
    assert mdd(0.5, 1e9) == pytest.approx(0.5 * (1.959964 + 0.841621), rel=1e-6)


def _metric_rows(values: dict, loss: dict | None = None) -> list[dict]:
    """Runs with every metric equal to the given per-seed value, ``{method: [values]}``."""
    rows = []
    for m, vals in values.items():
        for seed, v in enumerate(vals):
            rows.append(
                {
                    "method": m,
                    "seed": seed,
                    **{k: v for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")},
                    **({"test_loss": loss[m][seed]} if loss else {}),
                    **{f"{s}_seconds": 1.0 for s in ("select", "finetune", "evaluate")},
                }
            )
    return rows


def test_seed_level_table_and_tests():
    """The headline: per method the mean and 95 % t-interval over seeds, per comparison
    Welch's test over seeds, the test loss beside the ranking metrics."""
    from scipy import stats

    from jaxrec.experiment import markdown, summarise

    rows = _metric_rows(
        {"random": [0.010, 0.014, 0.012], "dealrec": [0.020, 0.016, 0.018, 0.022]},
        loss={"random": [7.0, 7.2, 7.1], "dealrec": [6.0, 6.4, 6.2, 6.6]},
    )
    table, tests = summarise(rows, ["random", "dealrec"])
    r = table[0]
    assert r["method"] == "random" and r["runs"] == 3
    half = stats.t.ppf(0.975, 2) * 0.002 / 3**0.5
    assert (r["recall@20_lo"], r["recall@20_hi"]) == pytest.approx((0.012 - half, 0.012 + half))
    assert r["test_loss_mean"] == pytest.approx(7.1)
    assert {t["metric"] for t in tests} == {"recall@10", "recall@20", "ndcg@10", "ndcg@20"} | {
        "test_loss"
    }
    (t,) = [t for t in tests if t["metric"] == "test_loss"]
    ref = stats.ttest_ind([6.0, 6.4, 6.2, 6.6], [7.0, 7.2, 7.1], equal_var=False)
    assert t["mean_diff"] == pytest.approx(-0.8) and t["p"] == pytest.approx(ref.pvalue)
    text = markdown(table, tests, [], {})
    assert "Welch's t-test over seeds" in text and "MDD" in text and "test loss" in text
    assert "0.0120 [" in text and "nan" not in text


def test_one_seed_says_no_test_instead_of_nan():
    from jaxrec.experiment import markdown, summarise

    rows = _metric_rows({"random": [0.01], "dealrec": [0.02]})
    table, tests = summarise(rows, ["random", "dealrec"])
    assert all(t["note"] == "one seed: no test" for t in tests) and len(tests) == 4
    text = markdown(table, tests, [], {})
    assert "one seed: no test" in text and "nan" not in text and "± 0" not in text
    assert "| dealrec | 1 | 0.0200 | 0.0200 | 0.0200 | 0.0200 | - |" in text  # no test loss


def test_cluster_bootstrap_is_the_resampled_difference():
    """Each draw's statistic equals the difference of the grand means of the explicitly
    resampled seeds x users (same draws of the generator), and the interval covers the
    difference of the observed means."""
    from jaxrec.experiment.stats import cluster_bootstrap

    rng = np.random.default_rng(1)
    a, b = rng.random((5, 30)) + 0.1, rng.random((4, 30))
    lo, hi = cluster_bootstrap(a, b, draws=400, seed=3)
    assert lo < a.mean() - b.mean() < hi
    # the same draws, expanded into index lists
    gen = np.random.default_rng(3)
    cu = gen.multinomial(30, np.full(30, 1 / 30), size=400)
    diffs = np.zeros(400)
    for x, sign in ((a, 1), (b, -1)):
        cs = gen.multinomial(len(x), np.full(len(x), 1 / len(x)), size=400)
        for d in range(400):
            seeds = np.repeat(np.arange(len(x)), cs[d])
            users = np.repeat(np.arange(30), cu[d])
            diffs[d] += sign * x[np.ix_(seeds, users)].mean()
    assert (lo, hi) == pytest.approx((np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)))


def test_archived_row_without_test_loss_gets_it_from_per_user_losses(tmp_path):
    from jaxrec.archive import METRICS, RunArchive

    archive = RunArchive(tmp_path)
    metrics = {k: np.full(3, 0.5) for k in METRICS}
    row = {"key": "k1", "method": "random", "seed": 0, "recall@20": 0.5}
    archive.add(row, np.arange(3), metrics, np.array([1.0, 2.0, 6.0]))
    archive.save()
    got = RunArchive(tmp_path).row("k1", {"method": "random", "seed": 0})
    assert got["test_loss"] == pytest.approx(3.0)


def test_seeds_of_sets_per_method_seeds(tmp_path):
    from jaxrec.experiment import read_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(
        "experiment:\n  methods: [random, dealrec, greedy]\n  seeds: [0, 1, 2, 3]\n"
        "  seeds_of: {greedy: [0, 1]}\n"
    )
    _, exp, cells = read_experiment(ExperimentArgs(config=str(path)))
    assert sorted(c.seed for c in cells if c.method == "greedy") == [0, 1]
    assert sorted(c.seed for c in cells if c.method == "random") == [0, 1, 2, 3]
    assert len(cells) == 10
    path.write_text(
        "experiment:\n  methods: [random, greedy]\n  seeds: [0]\n  seeds_of: {greedy: [5]}\n"
    )
    _, _, cells = read_experiment(ExperimentArgs(config=str(path), seeds=[5]))
    assert [c.name for c in cells] == ["random-seed0", "greedy-seed5"]
    for bad, message in (
        ("{best: [0]}", "seeds_of names 'best'"),
        ("{greedy: []}", "non-empty list of distinct int seeds"),
        ("{greedy: [1, 1]}", "non-empty list of distinct int seeds"),
        ("{greedy: 3}", "non-empty list of distinct int seeds"),
        ("[0]", "seeds_of must be a mapping"),
    ):
        path.write_text(
            f"experiment:\n  methods: [random, greedy]\n  seeds: [0]\n  seeds_of: {bad}\n"
        )
        with pytest.raises(UserError, match=message):
            read_experiment(ExperimentArgs(config=str(path)))


# ----------------------------------------------------------------------------- run locks
def _grab(folder: str, n: int, queue) -> None:
    from jaxrec.experiment import locks

    queue.put([i for i in range(n) if locks.acquire(Path(folder) / f"{i}.lock")])


def test_run_locks_give_each_run_to_one_process(tmp_path):
    """Four processes race for the same 40 locks (O_EXCL): each lock goes to exactly one."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_grab, args=(str(tmp_path), 40, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(i for g in got for i in g) == list(range(40))


def test_a_stale_lock_of_a_dead_local_process_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from jaxrec.experiment import locks

    lock = tmp_path / "run.lock"
    assert locks.acquire(lock) and not locks.acquire(lock)  # held by a live process: this one
    locks.release(lock)
    assert not lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": 0}))
    assert locks.acquire(lock) and locks.holder(lock)["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "another-machine", "pid": dead.pid, "time": 0}))
    assert not locks.acquire(lock)  # a holder on another host cannot be checked: left alone
    assert not list(tmp_path.glob("*.stale.*"))


def test_figures_draw_no_zero_bars_and_no_one_point_sweeps(tmp_path):
    """One seed: no error bar (its spread is unknown, not zero); a swept key with one finished
    value: no sweep plot, the per-method figure instead."""
    from jaxrec.experiment import summarise, write_csv
    from jaxrec.figures import error_bars, experiment_figures

    rows = _metric_rows({"random": [0.01], "dealrec": [0.02, 0.03]})
    for r in rows:
        r["select.n"] = 8
    table, _ = summarise(rows, ["random", "dealrec"], ["select.n"])
    bars = error_bars(table, "recall@20")
    assert np.isnan(bars[0]) and bars[1] == pytest.approx(np.std([0.02, 0.03], ddof=1))
    assert error_bars(table[:1], "recall@20") is None
    write_csv(tmp_path / "results.csv", table)
    (tmp_path / "experiment.json").write_text(json.dumps({"sweep": {"select.n": [8, 16]}}))
    assert [p.name for p in experiment_figures(tmp_path)] == ["methods.png"]


def test_shards_split_the_runs_asked_for():
    sweep = {"select.n": [8, 16]}
    exp = ExperimentConfig(methods=["random", "dealrec"], seeds=[0, 1, 2], sweep=sweep)
    cells = experiment_cells(exp, check_sweep(sweep, {}, "cfg"))
    parts = [
        selected_cells(cells, ExperimentArgs(config="cfg", shard=f"{i}/3"), sweep)
        for i in (1, 2, 3)
    ]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(c.name for p in parts for c in p) == sorted(c.name for c in cells)
    assert parts[1][0] == cells[1] and parts[1][1] == cells[4]
    dealrec = selected_cells(
        cells, ExperimentArgs(config="cfg", methods=["dealrec"], shard="2/2"), sweep
    )
    assert [c.name for c in dealrec] == [  # dealrec's 6 runs, the 2nd of every 2
        "dealrec-seed1-select.n=8",
        "dealrec-seed0-select.n=16",
        "dealrec-seed2-select.n=16",
    ]
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(UserError, match="is not I/K"):
            selected_cells(cells, ExperimentArgs(config="cfg", shard=bad), sweep)


def test_plan_says_what_would_run_and_stops(tmp_path, capsys):
    """``--plan``: the runs asked for, archived, finished and to run, and a rough time (no
    timed run here: 10 min a run), said before any stage; then nothing runs or is written."""
    import yaml

    from jaxrec.cli import main as cli
    from jaxrec.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", n_users=40, n_items=20, n_clusters=2, max_len=6)
    cfg = {
        "pipeline": {"workdir": str(tmp_path / "w"), "data": str(data), "backend": "tiger"},
        "experiment": {
            "methods": ["random", "dealrec"],
            "seeds": [0, 1],
            "seeds_of": {"dealrec": [3]},
        },
        "evaluate": {"beams": 20},  # TIGER needs 20 beams for Recall@20 (checked when read)
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["experiment", str(path), "--plan"]) == 0
    log = capsys.readouterr().err
    assert "3 runs (2 methods x seeds random 2, dealrec 1 x 1 grid points)" in log
    assert "3 runs asked for: 0 archived, 0 finished in the workdir, 3 to run, about 30 min" in log
    assert "(10 min a run, no timed run to go by)" in log
    assert "dealrec train-surrogate" not in log and not (tmp_path / "w" / "runs").exists()
    assert not (tmp_path / "w" / "results.csv").exists()


@pytest.mark.parametrize(
    "field,values", [("methods", "[random, dealrec, random]"), ("seeds", "[0, 1, 0]")]
)
def test_an_experiment_listing_a_method_or_seed_twice_is_refused(tmp_path, field, values):
    from jaxrec.errors import UserError
    from jaxrec.experiment import ExperimentArgs, read_experiment

    config = tmp_path / "exp.yaml"
    other = "seeds: [0]" if field == "methods" else "methods: [random]"
    config.write_text(f"experiment:\n  {field}: {values}\n  {other}\n")
    with pytest.raises(UserError, match=f"{field} lists .* twice"):
        read_experiment(ExperimentArgs(config=str(config)))


def test_tiger_beams_below_20_are_refused_before_any_stage(tmp_path):
    """A TIGER run with ``evaluate.beams: 5`` (fewer than Recall@20's 20) fails when the config
    is read, not at stage 7."""
    from jaxrec.errors import UserError
    from jaxrec.pipeline import read_experiment_file

    config = tmp_path / "run.yaml"
    config.write_text("pipeline:\n  backend: tiger\nevaluate:\n  beams: 5\n")
    with pytest.raises(UserError, match="beams"):
        read_experiment_file(config)
