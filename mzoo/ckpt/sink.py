"""Output files written by a second thread: checksummed on the way out, fsynced when they close.

Why a thread: here the write syscall, CRC-32 and fsync each cost about as much as producing the
tensor (reading the source, regrouping QKV); handing the bytes to a writer thread overlaps them
with producing the next tensor (zlib, os.write and os.fsync release the GIL). Why the CRC here:
the CRC-32 computed as bytes leave is the one `mzoo.yaml` records, so nothing written is read back
to be hashed. Each sink fsyncs its own file in its own thread when it closes, so a finished file
reaches the disk while the next one is being written, and `atomic_dir`'s final fsync finds little
left to do.

Memory: at most `Budget.limit` bytes of buffers wait to be written, but a buffer larger than that
is still accepted once no other buffer waits; so at most one large tensor is alive here (being
written) besides the one being produced. Kernel copies hold no memory; at most `Budget.copy_limit`
bytes of them wait.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from mzoo.errors import UserError

try:  # zlib-ng's CRC-32 (SIMD): the same checksum at ~11 GB/s instead of zlib's ~3.5 here
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a platform without its wheel
    from zlib import crc32

Buffer = Union[bytes, bytearray, memoryview]

# (st_dev, st_ino, size, mtime_ns) -> CRC-32 of a file a sink wrote and closed in this process. The inode
# survives the rename of a temporary folder into place; a file changed since has another size or mtime.
_KNOWN_CRC: dict[tuple[int, int, int, int], int] = {}
_KNOWN_LOCK = threading.Lock()
_MAX_WRITE = 1 << 30  # Linux writes at most 0x7ffff000 bytes per call
_FLUSH_EVERY = 32 << 20  # start write-back of each 32 MB written (sync_file_range), so fsync finds little left


def _sync_file_range() -> Optional[Callable[[int, int, int], None]]:
    """Linux's sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): queue write-back, do not wait."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, n: fn(fd, offset, n, 2)


_START_WRITEBACK = _sync_file_range()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def known_crc(path: Path) -> Optional[int]:
    """The CRC-32 a sink computed while writing `path`, if the file has not changed since."""
    try:
        key = _identity(os.stat(path))
    except OSError:
        return None
    with _KNOWN_LOCK:
        return _KNOWN_CRC.get(key)


# ---- CRC-32 of a concatenation from the parts' CRCs (zlib's crc32_combine, which Python lacks) -----
def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def _zero_operators() -> list[list[int]]:
    """Operators that append 2**k zero bytes (k = 0..63) to a CRC-32 register."""
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    ops = []
    for _ in range(64):
        even = _gf2_square(odd)  # 8 * 2**k bits = 2**k bytes
        ops.append(even)
        odd = even
    return ops


_ZERO_OPS = _zero_operators()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B): O(log len2), no pass over the bytes."""
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(_ZERO_OPS[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def tensor_bytes(value: torch.Tensor) -> memoryview:
    """The bytes of a tensor, without a copy when it is contiguous (the view keeps it alive)."""
    value = value.detach().contiguous().cpu()
    if value.numel() == 0:
        return memoryview(b"")
    return memoryview(value.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class Extent:
    """`length` bytes at `offset` of the file `path` (None: that many zero bytes, e.g. vocabulary
    padding). A tensor that is a concatenation of extents of the source files (a Hugging Face
    tensor, Megatron's grouped QKV, [gate; up]) is copied by the kernel, never through Python."""

    path: Optional[Path]
    offset: int
    length: int


@dataclass(frozen=True)
class TensorExtents:
    """A tensor (shape, dtype, C order) whose bytes are the concatenation of `extents`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    extents: tuple[Extent, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self.extents)

    def rows(self, start: int, count: int) -> "TensorExtents":
        """Rows [start, start + count) along dim 0."""
        if not self.shape or start < 0 or count < 0 or start + count > self.shape[0]:
            raise ValueError(f"rows {start}:{start + count} of a tensor of shape {self.shape}")
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        begin, end = start * row, (start + count) * row
        out, at = [], 0
        for e in self.extents:  # the parts of the extents that overlap [begin, end)
            lo, hi = max(begin, at), min(end, at + e.length)
            if lo < hi:
                out.append(Extent(e.path, e.offset + (lo - at) if e.path is not None else 0, hi - lo))
            at += e.length
        return TensorExtents((count, *self.shape[1:]), self.dtype, tuple(out))


    def pad_rows(self, rows: int) -> "TensorExtents":
        """Zero rows appended up to `rows` (pad_vocab on extents)."""
        if self.shape[0] >= rows:
            return self
        row = self.nbytes // self.shape[0]
        return TensorExtents((rows, *self.shape[1:]), self.dtype,
                             (*self.extents, Extent(None, 0, (rows - self.shape[0]) * row)))


def cat_rows(parts: list[TensorExtents]) -> TensorExtents:
    """torch.cat(parts, dim=0) as extents."""
    first = parts[0]
    if any(p.shape[1:] != first.shape[1:] or p.dtype != first.dtype for p in parts):
        raise ValueError("cat_rows of tensors with different trailing shapes or dtypes")
    return TensorExtents((sum(p.shape[0] for p in parts), *first.shape[1:]), first.dtype,
                         tuple(e for p in parts for e in p.extents))


_ZEROS = bytes(1 << 20)


def extents_crc(extents: list[Extent], window: int = 64 << 20) -> int:
    """CRC-32 of the extents' bytes, read through short-lived mappings of at most `window` bytes
    (1.6x faster than pread into a buffer here; unmapped at once, so RSS does not grow)."""
    crc = 0
    for e in extents:
        if e.path is None:
            for start in range(0, e.length, len(_ZEROS)):
                crc = crc32(_ZEROS[: min(len(_ZEROS), e.length - start)], crc)
            continue
        with open(e.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < e.offset + e.length:
                raise UserError(f"{e.path} is truncated (it ends before byte {e.offset + e.length}); "
                                "re-download or re-convert it.")
            done = 0
            while done < e.length:
                start = e.offset + done
                base = start - start % mmap.ALLOCATIONGRANULARITY
                size = min(window, e.offset + e.length - base)
                with mmap.mmap(f.fileno(), size, offset=base, prot=mmap.PROT_READ) as m:
                    view = memoryview(m)
                    try:
                        crc = crc32(view[start - base : size], crc)
                    finally:
                        view.release()
                done += size - (start - base)
    return crc


@dataclass
class Piece:
    """One buffer (or list of extents) handed to a sink; `crc` is set once it is written
    (for extents, before: the producer computes it while the writer copies the previous piece)."""

    data: Optional[Buffer]
    deferred: Optional[Callable[[], bytes]] = None
    crc: int = 0
    size: int = 0
    extents: Optional[list[Extent]] = None



class Budget:
    """Bytes queued but not yet written, shared by the sinks open at once (a legacy stage writes
    TP x EP rank files together): a producer waits while the buffers held in memory are over
    `limit`, or the kernel copies not yet made are over `copy_limit` (they hold no memory, but
    bounding them keeps the progress bar honest and the producer close behind the disk)."""

    def __init__(self, limit: int = 64 << 20, copy_limit: int = 512 << 20):
        self.limit, self.copy_limit = limit, copy_limit
        self.pending = 0  # bytes of queued buffers
        self.copies = 0  # bytes of queued copies
        self.cond = threading.Condition()

    def full(self, piece: "Piece") -> bool:
        if piece.extents is not None:
            return bool(self.copies) and self.copies + piece.size > self.copy_limit
        return bool(self.pending) and self.pending + piece.size > self.limit

    def add(self, piece: "Piece", sign: int = 1) -> None:
        if piece.extents is not None:
            self.copies += sign * piece.size
        else:
            self.pending += sign * piece.size


class FileSink:
    """Appends buffers to a new file from a writer thread; `close()` fsyncs and closes it there too."""

    def __init__(self, path: Path, budget: Optional[Budget] = None):
        self.path = Path(path)
        self.budget = budget or Budget()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.position = 0  # bytes accepted so far: the file offset of the next write
        self.crc = 0  # CRC-32 of everything written (valid after close)
        self._queue: deque[Optional[Piece]] = deque()
        self._cond = self.budget.cond
        self._sources: dict[Path, int] = {}  # open source files of extents, by path
        self._written = self._flushed = 0  # bytes written / handed to write-back (writer thread)
        self._error: Optional[BaseException] = None
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"mzoo-sink-{self.path.name}", daemon=True)
        self._thread.start()

    # ---- producer side --------------------------------------------------------------------------
    def write(self, data: Buffer) -> Piece:
        """Queue `data` (kept alive until written); returns its Piece (crc set once written). The
        bytes are read later, on the writer thread: do not change them before `wait()` returns."""
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        piece = Piece(view, size=len(view))
        self._put(piece)
        return piece

    def write_tensor(self, value: torch.Tensor) -> Piece:
        return self.write(tensor_bytes(value))

    def copy(self, extents: list[Extent]) -> Piece:
        """Queue a kernel copy of the extents (copy_file_range); their CRC-32 is computed here, on the
        caller's thread, while the writer thread copies what came before."""
        piece = Piece(None, size=sum(e.length for e in extents), extents=list(extents))
        piece.crc = extents_crc(piece.extents)
        self._put(piece)
        return piece

    def write_deferred(self, size: int, make: Callable[[], bytes]) -> Piece:
        """Queue bytes made on the writer thread when their turn comes (e.g. a zip data descriptor,
        which needs the CRC of the piece before it); `make()` must return exactly `size` bytes."""
        piece = Piece(None, deferred=make, size=size)
        self._put(piece)
        return piece

    def _put(self, piece: Piece) -> None:
        with self._cond:
            budget = self.budget
            while self._error is None and budget.full(piece):
                self._cond.wait()
            self._raise()
            self._queue.append(piece)
            budget.add(piece)
            self.position += piece.size
            self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Queue fsync + close; returns at once. `wait()` blocks until the file is on disk."""
        with self._cond:
            if self._done:
                return
            self._done = True
            self._queue.append(None)
            self._cond.notify_all()

    def wait(self) -> None:
        """Block until the writer thread has finished; re-raise any write error here."""
        self.close()
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop writing (the file stays incomplete; its temporary folder is removed by the caller)."""
        with self._cond:
            self._error = self._error or RuntimeError(f"{self.path}: writing was abandoned")
            self._queue.append(None)  # the thread skips what is queued once an error is set
            self._done = True
            self._cond.notify_all()
        self._thread.join()

    # ---- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    piece = self._queue[0]
                if piece is None:
                    break
                if self._error is None:
                    self._write_piece(piece)
                    self._written += piece.size
                    if _START_WRITEBACK is not None and self._written - self._flushed >= _FLUSH_EVERY:
                        _START_WRITEBACK(self.fd, self._flushed, self._written - self._flushed)
                        self._flushed = self._written
                with self._cond:
                    self._queue.popleft()
                    self.budget.add(piece, -1)
                    piece.data = None  # release the tensor
                    self._cond.notify_all()
            if self._error is None:
                os.fsync(self.fd)
        except BaseException as e:  # noqa: BLE001 - handed to the producer, raised there
            with self._cond:
                self._error = e
                for p in self._queue:
                    if p is not None:
                        self.budget.add(p, -1)
                self._queue.clear()
                self._cond.notify_all()
        finally:
            for fd in self._sources.values():
                os.close(fd)
            os.close(self.fd)
            if self._error is None:
                with _KNOWN_LOCK:
                    _KNOWN_CRC[_identity(os.stat(self.path))] = self.crc  # after close: mtime is final

    def _write_piece(self, piece: Piece) -> None:
        if piece.extents is not None:
            for e in piece.extents:
                self._copy(e)
            self.crc = crc32_combine(self.crc, piece.crc, piece.size)
            return
        data = piece.deferred() if piece.deferred is not None else piece.data
        if len(data) != piece.size:
            raise RuntimeError(f"{self.path}: a deferred piece made {len(data)} bytes, {piece.size} promised")
        piece.crc = crc32(data)
        self.crc = crc32_combine(self.crc, piece.crc, piece.size)
        self._write_all(memoryview(data))

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done : done + _MAX_WRITE])

    def _copy(self, e: Extent) -> None:
        """copy_file_range (in-kernel, 3x faster than write() from user memory on the VMs measured),
        else sendfile, else read and write: not every file system or kernel supports the first two."""
        if e.path is None:
            for start in range(0, e.length, len(_ZEROS)):
                self._write_all(memoryview(_ZEROS)[: min(len(_ZEROS), e.length - start)])
            return
        src = self._sources.get(e.path)
        if src is None:
            src = self._sources[e.path] = os.open(e.path, os.O_RDONLY)
        done = 0
        while done < e.length:
            n = min(e.length - done, _MAX_WRITE)
            got = self._copy_range(src, e.offset + done, n)
            if got == 0:
                raise UserError(f"{e.path} is truncated (it ends before byte {e.offset + e.length}); "
                                "re-download or re-convert it.")
            done += got

    def _copy_range(self, src: int, offset: int, count: int) -> int:
        global _KERNEL_COPY
        if _KERNEL_COPY == "copy_file_range":
            try:
                return os.copy_file_range(src, self.fd, count, offset)
            except OSError:
                _KERNEL_COPY = "sendfile"
        if _KERNEL_COPY == "sendfile":
            try:
                return os.sendfile(self.fd, src, offset, count)
            except OSError:
                _KERNEL_COPY = "write"
        data = os.pread(src, min(count, 8 << 20), offset)
        self._write_all(memoryview(data))
        return len(data)


_KERNEL_COPY = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
