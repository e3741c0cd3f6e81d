"""Run locks: several processes (on one machine, or on several machines sharing the workdir's
storage) take runs from one experiment without running a run twice (issue 28).

A lock is a file created atomically with ``O_CREAT | O_EXCL`` (atomic on local file systems and
on NFSv3+), holding JSON ``{"host", "pid", "time"}`` of its holder (a run lock also the run's
reuse key, ``"run"``: :mod:`jaxrec.experiment.folders`). A process that finds a lock
leaves the run to its holder; a lock whose holder is a dead process *of this host* is stale and
taken over (a holder on another host cannot be checked from here: delete its lock by hand if
that machine died, the run folder then resumes where it stopped).
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterator


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def holder(path: Path) -> dict | None:
    """The holder written in lock ``path`` (``None``: no lock; ``{}``: unreadable, e.g. being
    written)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def is_stale(found: dict | None) -> bool:
    """Whether a lock's holder is a process of this host that no longer runs."""
    if not found or found.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(found["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def acquire(path: Path, note: dict | None = None) -> bool:
    """Take lock ``path`` for this process: True when it is ours now (created, or taken over
    from a dead local holder), False when another live process holds it.

    Args:
      path: the lock file (its folder must exist).
      note: written into the lock beside its holder (a run lock: ``{"run": reuse key}``).
    Returns:
      whether this process holds the lock.
    """
    path = Path(path)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = holder(path)
            if found is None:
                continue  # released meanwhile: try again
            if not is_stale(found) or not _take_over(path, found):
                return False
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({**_me(), **(note or {})}))
        return True
    return False


def _take_over(path: Path, stale: dict) -> bool:
    """Move the stale lock ``path`` aside (atomic rename to a name of this process) and check
    that what moved is the lock judged stale; if a live process had re-created the lock in
    between, put its lock back. True when the stale lock is gone."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # another process moved it first
    moved = holder(aside)
    if moved != stale:
        try:
            os.link(aside, path)  # fails when a third process holds the lock by now
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
    return moved == stale


def release(path: Path) -> None:
    """Remove lock ``path`` if this process holds it."""
    found = holder(path)
    if found and found.get("pid") == os.getpid() and found.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)


@contextmanager
def held(path: Path, say: Callable[[str], None], poll: float = 2.0) -> Iterator[None]:
    """Hold lock ``path`` for the ``with`` block, waiting (polling every ``poll`` seconds)
    while another live process holds it: the shared stages, which every process needs done
    before its runs, run in one process while the others wait, then find them finished.

    Args:
      path: the lock file.
      say: the log (told once when waiting).
      poll: seconds between tries.
    """
    told = False
    while not acquire(path):
        if not told:
            found = holder(path) or {}
            say(f"waiting for {path.name}: held by {found.get('host')} pid {found.get('pid')}")
            told = True
        time.sleep(poll)
    try:
        yield
    finally:
        release(path)


__all__ = ["acquire", "held", "holder", "is_stale", "release"]
