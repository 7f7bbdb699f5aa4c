"""Atomic output, one mechanism for every writer (convert, init, reshard, push staging, training saves).

A result is built under a hidden sibling `DST.mzoo-tmp-*` that its writer holds an flock on, then
switched in with one rename: RENAME_NOREPLACE when DST must not exist (a folder created at DST
meanwhile is never replaced, and of two concurrent writers one fails with a sentence), RENAME_EXCHANGE
with --overwrite (old and new swap in one step, so DST is never missing; the old copy is removed after).
A killed run leaves only `*.mzoo-tmp-*` / `*.mzoo-old-*` siblings whose lock nobody holds: the next
writer to the same place removes them and says so, and `inspect` reports them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mzoo.capacity import bytes_text as _size
from mzoo.errors import UserError

TMP_TAG = ".mzoo-tmp-"
OLD_TAG = ".mzoo-old-"
FAULT_ENV = "MZOO_FAULT"  # `name` (SIGKILL there) or `name:enospc` (a full disk there): crash-safety tests
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


class OutputError(UserError):
    """The destination cannot be written as asked; the message says how to fix it."""


class DiskFullError(OutputError):
    """The output does not fit (checked before writing) or the disk filled while writing."""


def fault(name: str) -> None:
    """A named window between two steps of a writer; MZOO_FAULT makes a test die or run out of disk there."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    point, _, kind = spec.partition(":")
    if point != name:
        return
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)


# ---- permissions ---------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: give them what open()/mkdir() would."""
    mode = (0o777 if Path(path).is_dir() else 0o666) & ~_umask()
    os.chmod(path, mode)


def honour_umask_tree(root: Path) -> None:
    for path in [Path(root), *Path(root).rglob("*")]:
        if not path.is_symlink():
            honour_umask(path)


# ---- renames ----------------------------------------------------------------------------------------------
def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system does not offer it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move src to dst only if dst does not exist; otherwise a sentence, and dst is untouched."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
        if os.path.lexists(dst):  # portable fallback: a small race, where renameat2 has none
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
    except (FileExistsError, OSError) as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputError(f"{dst} appeared while this run was writing it (another run?); it was left as it "
                              f"is: remove it or pass --overwrite.") from None
        raise


def exchange(src: Path, dst: Path) -> None:
    """Swap src and dst in one step (dst is never missing; without renameat2, only a kill between the
    fallback's two renames leaves it missing); afterwards src holds the old dst."""
    if _renameat2(src, dst, _RENAME_EXCHANGE):
        return
    old = dst.with_name(f"{dst.name}{OLD_TAG}{os.getpid()}")  # portable fallback: two renames
    os.rename(dst, old)
    try:  # dst is missing until the next rename: a kill here leaves both copies, which `inspect dst` names
        fault("exchange-fallback")
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)  # a failure (a full disk) puts the old copy back
        raise
    os.rename(old, src)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


# ---- locks and leftovers -----------------------------------------------------------------------------------
def try_lock(path: Path) -> Optional[int]:
    """An fd holding an exclusive flock on `path` (a file or folder), or None if another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def leftovers(dst: Path) -> list[Path]:
    """Temporaries of killed writers to `dst` (their lock is free); a live writer's are not listed."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return []
    found = []
    name = glob_escape(dst.name)
    for path in sorted([*dst.parent.glob(f"{name}.mzoo-*"), *dst.parent.glob(f".{name}.mzoo-*")]):
        if ".mzoo-tmp" not in path.name and OLD_TAG not in path.name:
            continue
        fd = try_lock(path)
        if fd is not None:
            os.close(fd)
            found.append(path)
    return found


def leftovers_in(folder: Path) -> list[Path]:
    """Every unlocked temporary directly in `folder` or in its parent for it (what `inspect` reports)."""
    folder = Path(folder)
    out = leftovers(folder)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if (".mzoo-tmp" in path.name or OLD_TAG in path.name) and path not in out:
                fd = try_lock(path)
                if fd is not None:
                    os.close(fd)
                    out.append(path)
    return out


def missing_note(dst: Path) -> str:
    """What to say of a missing `dst` beside which a killed writer left copies ('' when none)."""
    left = leftovers(dst)
    if not left:
        return ""
    old = [p for p in left if OLD_TAG in p.name]
    fix = (f"rename {old[0].name} (the copy an interrupted --overwrite was replacing) back to {Path(dst).name}, or "
           "rerun the command that writes it") if old else "rerun the command that writes it (it removes them)"
    return f"an interrupted run left {', '.join(p.name for p in left)} beside it: {fix}"


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def sweep(dst: Path) -> list[Path]:
    """Remove the temporaries a killed writer to `dst` left, and say so on stderr (never silently)."""
    gone = []
    for path in leftovers(dst):
        remove(path)
        gone.append(path)
    if gone:
        names = ", ".join(p.name for p in gone)
        sys.stderr.write(f"note: removed {len(gone)} temporary file(s) an interrupted run left beside {dst}: {names}\n")
    return gone


# ---- checks -----------------------------------------------------------------------------------------------
FREE_ENV = "MZOO_FREE_BYTES"  # test hook: the free bytes every check sees (a nearly full disk)


def free_bytes(folder: Path) -> int:
    override = os.environ.get(FREE_ENV, "")
    return int(override) if override.isdigit() else shutil.disk_usage(folder).free


def check_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse before writing what will not fit (5% and 64 MiB of slack for metadata and estimates)."""
    if need_bytes <= 0:
        return
    free = free_bytes(folder)
    if need_bytes + max(need_bytes // 20, 64 << 20) > free:
        raise DiskFullError(f"{what} needs about {_size(need_bytes)} but {folder} has {_size(free)} free; "
                            f"free some space or write elsewhere.")


def check_destination(dst: Path, overwrite: bool = False, need_bytes: int = 0) -> None:
    """Fail before any work when DST exists and would be clobbered, or cannot be written, or will not fit."""
    dst = Path(dst)
    if os.path.lexists(dst) and not overwrite:
        what = "folder" if dst.is_dir() else "file"
        raise OutputError(f"{dst} already exists (a {what}); remove it or pass --overwrite.")
    parent = dst.absolute().parent
    if not parent.exists():
        raise OutputError(f"the parent folder {parent} does not exist; create it first.")
    if not parent.is_dir():
        raise OutputError(f"{parent} is a file, not a folder; choose a destination inside a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent} (no permission, or a read-only file system); "
                          f"choose a writable destination.")
    check_space(parent, need_bytes, f"writing {dst}")


def disk_full(dst: Path) -> DiskFullError:
    free = free_bytes(Path(dst).absolute().parent)
    return DiskFullError(f"the disk filled while writing {dst} ({_size(free)} free now); nothing was left behind: "
                         f"free some space or write elsewhere, then rerun.")


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the writer -----------------------------------------------------------------------------------------
def new_temp_dir(dst: Path) -> tuple[Path, int]:
    """A locked, umask-honouring temporary sibling of `dst`: (its path, the fd holding its lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{dst.name}{TMP_TAG}", dir=dst.absolute().parent))
    honour_umask(tmp)
    fd = try_lock(tmp)
    assert fd is not None  # just created: nobody else can hold it
    return tmp, fd


def switch_in(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Put the finished `tmp` at `dst`: never replacing what appeared meanwhile unless `overwrite`,
    never leaving `dst` missing; the replaced copy is removed last."""
    fault("before-switch")
    if overwrite and os.path.lexists(dst):
        exchange(tmp, dst)
        fault("after-exchange")
        remove(tmp)  # now the old copy
    else:
        rename_noreplace(tmp, dst)


@contextmanager
def atomic_dir(dst: Path, overwrite: bool = False, need_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `dst` (see `switch_in`), on error it is
    removed. A full disk at any point becomes a DiskFullError sentence."""
    dst = Path(dst)
    check_destination(dst, overwrite, need_bytes)
    sweep(dst)
    tmp, fd = new_temp_dir(dst)
    try:
        yield tmp
        honour_umask_tree(tmp)
        fsync_tree(tmp)
        switch_in(tmp, dst, overwrite)
    except OSError as e:
        remove(tmp)
        if e.errno == errno.ENOSPC:
            raise disk_full(dst) from None
        raise
    except BaseException:
        remove(tmp)
        raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """One small file (a tracker, mzoo.yaml, .metadata) replaced in one rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.mzoo-tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
