"""One training run per checkpoint root: `ROOT/.mzoo-lock`, an flock held for the whole run.

Two trainings saving into one root (a requeued job while the old one still runs) would interleave
their iterations' files; the second therefore fails at start, naming the holder. The lock is held by
the process that owns --save (the `mzoo` parent that launches the workers, or the only process / rank
0 under an outside launcher); the file records its pid and host for the message. flock is released by
the kernel when its holder dies, so a killed run's lock file never blocks the next run.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mzoo.errors import UserError

LOCK_NAME = ".mzoo-lock"
HELD_ENV = "MZOO_RUN_LOCK_HELD"  # set by a parent holding the lock for the workers it launches


class RootBusyError(UserError):
    """Another live training run saves into the same root."""


def holder(root: Path) -> str:
    """'pid P on host H' from the lock file, or a plain phrase when it cannot be read."""
    try:
        fields = dict(line.split("=", 1) for line in (Path(root) / LOCK_NAME).read_text().splitlines() if "=" in line)
    except OSError:
        fields = {}
    if "pid" in fields:
        return f"pid {fields['pid']} on host {fields.get('host', '?')}"
    return "another process"


def acquire(root: Path) -> int:
    """Create `root` if missing and take its run lock: the fd that holds it, or RootBusyError."""
    root = Path(root)
    root.mkdir(parents=False, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RootBusyError(f"--save {root} is in use by another training run ({holder(root)}); wait for it to "
                            f"finish or stop it, or save elsewhere.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode(), 0)
    return fd


@contextmanager
def run_lock(root: Optional[str | Path], owner: bool = True) -> Iterator[None]:
    """Hold `root`'s run lock for the block when this process owns --save (`owner`); else do nothing.
    Processes launched inside the block inherit HELD_ENV and do not try again."""
    if root is None or not owner or os.environ.get(HELD_ENV):
        yield
        return
    fd = acquire(Path(root))
    os.environ[HELD_ENV] = str(os.getpid())
    try:
        yield
    finally:
        os.environ.pop(HELD_ENV, None)
        os.close(fd)  # the file stays: removing it would race a run that opened it meanwhile
