"""Atomic output: build a checkpoint under a temporary name, fsync, rename last.

A killed run leaves `DST.mzoo-tmp-*` (plainly incomplete), never a DST that looks finished.
"""

from __future__ import annotations

from mzoo.errors import UserError

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class OutputError(UserError):
    """The destination cannot be written as asked; the message says how to fix it."""


def check_destination(dst: Path, overwrite: bool = False) -> None:
    """Fail before any work when DST exists and would be clobbered."""
    if dst.exists() and not overwrite:
        what = "folder" if dst.is_dir() else "file"
        raise OutputError(f"{dst} already exists (a {what}); remove it or pass --overwrite.")
    if not dst.parent.exists():
        raise OutputError(f"the parent folder {dst.parent} does not exist; create it first.")


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst)
    check_destination(dst, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f"{dst.name}.mzoo-tmp-", dir=dst.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if dst.exists():
            old = dst.with_name(f"{dst.name}.mzoo-old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".mzoo-tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
