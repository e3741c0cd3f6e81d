"""Running ``dealrec`` commands as child processes with one log: what ``dealrec run`` and
``dealrec experiment`` use for every stage (so JAX and PyTorch never share a process)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

from jaxrec.errors import UserError


class RunLog:
    """Stage headers to the terminal and everything to ``workdir/run.log``."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, file=sys.stderr, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def run(self, argv: list[str]) -> None:
        """Run ``dealrec ARGV`` in a child process; its output goes to the terminal and log."""
        cmd = [sys.executable, "-m", "jaxrec.cli", *argv]
        with open(self.path, "a", encoding="utf-8") as log:
            log.write("$ dealrec " + " ".join(argv) + "\n")
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            out = cast(io.BufferedReader, proc.stdout)  # stdout=PIPE: a buffered reader
            for chunk in iter(lambda: out.read1(4096), b""):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                log.write(chunk.decode(errors="replace"))
            code = proc.wait()
        if code != 0:
            raise UserError(
                f"stage 'dealrec {argv[0]}' failed with exit status {code} (see {self.path})"
            )
