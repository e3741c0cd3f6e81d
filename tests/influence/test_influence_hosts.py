"""Influence on several processes (JAX's multi-process runtime, CPU collectives over gloo):
2 local processes score every user as one process does (LiSSA, CG, exact), through the
library and through ``dealrec influence --coordinator``; a killed process leaves no score
file (issue 28)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.support import ROOT


# One process of P: every solver on this process's rows; prints {solver: scores}.
SCRIPT = r"""
import json, sys
run, coordinator, processes, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from jaxrec.influence import hosts
if processes > 1:
    hosts.initialize(coordinator, processes, index)
from jaxrec.config import InfluenceConfig, LissaOptions
from jaxrec.influence import dealrec_scores
from jaxrec.train import load_surrogate, negative_draw
import jax
rows = hosts.row_range(90) if processes > 1 else None  # tiny_run's 90 users
sur = load_surrogate(run, rows=rows)
out = {"rows": rows, "processes": jax.process_count()}
for solver, extra in (("lissa", {"lissa": LissaOptions(steps=40, batch_size=8)}),
                      ("cg", {}), ("exact", {})):
    cfg = InfluenceConfig(solver=solver, params="^ffn_1_0/bias$", negative_draws=2, batch_size=32,
                          **extra)
    s, info = dealrec_scores(sur.loss, sur.per_sample_loss, sur.sample_loss, sur.params,
                             sur.data, cfg, draw=negative_draw(sur.config, sur.data, sur.dataset),
                             progress=False)
    out[solver] = s.tolist()
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def launch(args_of, processes: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            args_of(i),
            env=env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]


def finish(procs, timeout=600) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny SASRec surrogate on 90 synthetic users (3 epochs: the scores need not be good;
    hidden 8, one block, sequences of at most 8 items: what is tested is that several
    processes compute what one does, which does not need a large model, and the 4-process
    case shares one core with its 3 siblings)."""
    from jaxrec.config import SurrogateConfig
    from jaxrec.data.synthetic import make_synthetic
    from jaxrec.train import train

    base = tmp_path_factory.mktemp("hosts")
    data = make_synthetic(base / "data", n_users=90, n_items=40, max_len=8, seed=1)
    cfg = SurrogateConfig(
        data=str(data),
        out=str(base / "run"),
        epochs=3,
        batch_size=32,
        seed=0,
        hidden=8,
        blocks=1,
        heads=1,
        max_len=8,
    )
    train(cfg, progress=False)
    return base / "run"


def library_scores(run, processes: int) -> dict:
    port = free_port()
    procs = launch(
        lambda i: [
            sys.executable,
            "-c",
            SCRIPT,
            str(run),
            f"localhost:{port}",
            str(processes),
            str(i),
        ],
        processes,
    )
    parts = [
        json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        for out in finish(procs)
    ]
    assert all(p["processes"] == processes for p in parts)
    return {s: np.concatenate([p[s] for p in parts]) for s in ("lissa", "cg", "exact")}


@pytest.fixture(scope="module")
def one_process(tiny_run) -> dict:
    return library_scores(tiny_run, 1)


@pytest.mark.parametrize("processes", [2, 4])
def test_several_processes_score_as_one(tiny_run, one_process, processes):
    one, several = one_process, library_scores(tiny_run, processes)
    for solver in ("lissa", "cg", "exact"):
        assert one[solver].shape == (90,) and np.abs(one[solver]).max() > 0
        np.testing.assert_allclose(
            several[solver],
            one[solver],
            rtol=1e-6,
            atol=1e-6 * np.abs(one[solver]).max(),
            err_msg=solver,
        )


def cli(run, out, *flags) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxrec.cli",
        "influence",
        "--run",
        str(run),
        "--out",
        str(out),
        "--params",
        "^ffn_1_0/bias$",
        "--negative-draws",
        "2",
        "--batch-size",
        "32",
        *flags,
    ]


def test_cli_two_processes_write_one_score_file(tiny_run, tmp_path):
    from jaxrec.data import load_scores

    finish(launch(lambda i: cli(tiny_run, tmp_path / "one.npy", "--steps", "40"), 1))
    port = free_port()
    hosts = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    finish(
        launch(lambda i: cli(tiny_run, tmp_path / "two.npy", "--steps", "40", *hosts, str(i)), 2)
    )
    one, m1 = load_scores(tmp_path / "one.npy", kind="influence")
    two, m2 = load_scores(tmp_path / "two.npy", kind="influence")
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-6 * np.abs(one).max())
    assert m2["processes"] == 2 and m2["parts"] == 2 and "processes" not in m1
    assert m2["options"] == m1["options"]  # where it ran is not what it computed
    assert m2["solver"]["steps_run"] == m1["solver"]["steps_run"]
    assert not (tmp_path / "two.npy.shards").exists()
    assert (tmp_path / m2["solver"]["norm_trace_file"]).is_file()


def test_killed_process_leaves_no_score_file(tiny_run, tmp_path):
    """Process 1 is killed once LiSSA's chunk program is compiled (its file in the run's own
    compilation cache: both processes are then in the recursion, which runs until killed)."""
    port = free_port()
    out = tmp_path / "killed.npy"
    cache = tmp_path / "cache"
    hosts = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    long = ["--steps", "1000000", "--lissa-tol", "0", "--chunk", "50"]  # runs until killed
    long += ["--compile-cache", str(cache)]
    procs = launch(lambda i: cli(tiny_run, out, *long, *hosts, str(i)), 2)
    try:
        deadline = time.monotonic() + 300
        while not list(cache.glob("jit_run_chunk*")) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a process ended before LiSSA ran"
            time.sleep(0.5)
        time.sleep(1)  # a few chunks
        assert all(p.poll() is None for p in procs)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=60)
        time.sleep(2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list((tmp_path / "killed.npy.shards").glob("*.json"))


def test_hosts_bench_command_plans_valid_influence_commands():
    """docs/benchmarks.md's ``bench/hosts.py`` command (``--plan``: its command lines only): one
    process on the given cores, then two processes (process i on core i of ``--cores``), each
    an influence command line that ``dealrec`` parses, with the benchmark's flags."""
    import shlex

    from jaxrec.cli import build_parser

    doc = (ROOT / "docs/benchmarks.md").read_text()
    line = next(x for x in doc.splitlines() if x.startswith("python bench/hosts.py RUN"))
    words = shlex.split(line.rstrip("\\")) + shlex.split(doc.split(line)[1].splitlines()[1])
    out = subprocess.run(
        [sys.executable, *words[1:], "--plan"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env(),
    ).stdout.splitlines()
    assert len(out) == 3
    for cmd, cores, process in zip(out, ["0", "0", "0"], [None, "0", "1"]):
        w = shlex.split(cmd)
        assert w[:3] == ["taskset", "-c", cores]
        args = build_parser().parse_args(w[w.index("jaxrec.cli") + 1 :])
        assert args.params == "^attn_out_1/kernel$" and args.steps == 100
        assert args.negative_draws == 2 and args.compile_cache == ""
        assert args.process_id == (None if process is None else int(process))
