"""``dealrec influence`` on 2 processes (one core each) against 1 process with 2 threads, side
by side on one trained surrogate: seconds per stage (from the manifests) and peak resident
memory per process (``/usr/bin/time -v``), alternating the two setups ``--rounds`` times.

    python bench/hosts.py RUN_DIR [--data DATA] [--out runs/hosts] [--rounds 2] [--cores 0,1]
                          [flags...]

Anything after the known options goes to ``dealrec influence`` unchanged (e.g. ``--params
'^attn_out_1/kernel$' --negative-draws 4``). The two-process run pins process ``i`` to core
``i`` (``taskset -c i``; ``--cores a,b``: cores ``a`` and ``b``, e.g. ``0,0`` when one core is
taken by other work) with one XLA thread; the one-process run gets those cores. Prints a
table and writes ``OUT/hosts.json``. Also prints the all-reduce sizes that the expected scaling
to ``P`` hosts is computed from (docs/benchmarks.md, "Several hosts").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(run, data, out, flags, cores, hosts=()) -> list[str]:
    cmd = ["taskset", "-c", cores, "/usr/bin/time", "-v", sys.executable, "-m", "jaxrec.cli"]
    cmd += ["influence", "--run", str(run), "--out", str(out), *flags, *hosts]
    return cmd + (["--data", data] if data else [])


def _rss_mib(stderr: str) -> float:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(m.group(1)) / 1024 if m else float("nan")


def _launch(cmds, env):
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(err[-3000:])
    return [_rss_mib(err) for _, err in outs]


def one_process(run, data, out, flags, cores=("0", "1")) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    rss = _launch([_cmd(run, data, out, flags, ",".join(sorted(set(cores))))], env)
    manifest = json.loads(Path(out).with_suffix(".json").read_text())
    return {"timing": manifest["timing"], "seconds": manifest["seconds"], "rss_mib": rss}


def two_processes(run, data, out, flags, cores=("0", "1")) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_THREAD, OMP_NUM_THREADS="1")
    port = _port()
    hosts = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    cmds = [_cmd(run, data, out, flags, cores[i], [*hosts, str(i)]) for i in range(2)]
    rss = _launch(cmds, env)
    manifest = json.loads(Path(out).with_suffix(".json").read_text())
    return {"timing": manifest["timing"], "seconds": manifest["seconds"], "rss_mib": rss}


def reductions(run, data, flags) -> dict:
    """Parameter count of the differentiated block and the bytes of one all-reduce."""
    from jaxrec.config import InfluenceConfig
    from jaxrec.influence.params import ParamSubset
    from jaxrec.train import load_surrogate

    pattern = flags[flags.index("--params") + 1] if "--params" in flags else ""
    sur = load_surrogate(run, data or None)
    n = ParamSubset(sur.params, pattern or InfluenceConfig.params).size
    return {"n_params": n, "allreduce_bytes": 4 * n, "users": sur.dataset.n_users}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", default="")
    ap.add_argument("--out", default="runs/hosts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", default="0,1", help="cores of processes 0 and 1 (taskset)")
    ap.add_argument("--plan", action="store_true", help="print the command lines only")
    args, flags = ap.parse_known_args(argv)
    cores = tuple(args.cores.split(","))
    if args.plan:  # what one round runs: the one process, then the two processes
        out = Path(args.out)
        one = ",".join(sorted(set(cores)))
        print(shlex.join(_cmd(args.run, args.data, out / "one0.npy", flags, one)))
        hosts = ["--coordinator", "localhost:PORT", "--num-processes", "2", "--process-id"]
        for i in range(2):
            cmd = _cmd(args.run, args.data, out / "two0.npy", flags, cores[i], [*hosts, str(i)])
            print(shlex.join(cmd))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        a = one_process(args.run, args.data, out / f"one{r}.npy", flags, cores)
        b = two_processes(args.run, args.data, out / f"two{r}.npy", flags, cores)
        load = [round(load, 1), round(os.getloadavg()[0], 1)]
        row = {"round": r, "one_process_2_threads": a, "two_processes_1_core": b}
        rows.append({**row, "load_average_1min": load})
        print(json.dumps(rows[-1]))
    result = {
        "flags": flags,
        "cores": list(cores),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "rounds": rows,
        **reductions(args.run, args.data, flags),
    }
    (out / "hosts.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| stage | 1 process, 2 threads s | 2 processes, 1 core each s | ratio |")
    print("|---|---|---|---|")
    for stage in ("load", "mean_gradient", "solve", "scores"):
        one = sum(x["one_process_2_threads"]["timing"][stage] for x in rows) / len(rows)
        two = sum(x["two_processes_1_core"]["timing"][stage] for x in rows) / len(rows)
        print(f"| {stage} | {one:.1f} | {two:.1f} | {two / one:.2f} |")
    print(f"all-reduce of one gradient / HVP: {result['allreduce_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
