"""Checksums verified by every reader as it first uses a file, so a corrupted or swapped file is one
sentence naming it instead of wrong weights or a traceback deep inside torch.

Two sources, both already on disk: the CRC-32 `mzoo.yaml` records per file (mzoo's checkpoints),
else what the format itself records (a torch.save zip archive's per-record CRC-32: Megatron-LM's
own legacy rank files and every torch_dist item). zlib-ng's SIMD CRC-32 (~11 GB/s) keeps one pass
over a file nearly free beside the read it precedes; a file is verified
once per process (keyed by inode, size and mtime, so a file changed since is verified again).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import torch

from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.sink import Extent, TensorExtents, extents_crc

SIDECAR = "mzoo.yaml"
_VERIFIED: set[tuple[int, int, int, int, int, int]] = set()  # (dev, ino, size, mtime_ns, offset, length)
_DEFERRED = contextvars.ContextVar("mzoo_checksums_deferred", default=False)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Readers opened inside skip checksums: `inspect` checks every file itself and lists each problem."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def _key(path: Path, offset: int = 0, length: int = -1) -> tuple[int, int, int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, offset, length


def _recorded(folder: Path) -> tuple[Path, dict[str, str], dict[str, int]]:
    """mzoo.yaml's CRC-32 map and the folder its paths are relative to: the checkpoint folder, or
    for a Megatron iteration folder the root above it (where mzoo writes the sidecar)."""
    from mzoo.ckpt.sidecar import read_sidecar

    for base in (folder, folder.parent):
        if (base / SIDECAR).is_file():
            try:
                side = read_sidecar(base) or {}
            except Exception:  # noqa: BLE001 - a damaged sidecar is inspect's to report; verify by format then
                return base, {}, {}
            crcs, sizes = side.get("crc32"), side.get("files")
            return (base, {str(k): str(v) for k, v in crcs.items()} if isinstance(crcs, dict) else {},
                    {str(k): v for k, v in sizes.items()} if isinstance(sizes, dict) else {})
    return folder, {}, {}


class Checksums:
    """The CRC-32s recorded for one checkpoint's files; `verify(path)` before reading `path`."""

    def __init__(self, folder: str | Path):
        self.base, self.crcs, self.sizes = _recorded(Path(folder))

    def covers(self, path: Path) -> bool:
        return self._rel(path) in self.crcs

    def _rel(self, path: Path) -> Optional[str]:
        try:
            return str(Path(path).relative_to(self.base))
        except ValueError:
            return None

    def verify(self, path: Path) -> bool:
        """Check `path` against mzoo.yaml's CRC-32 (once); False when mzoo.yaml records none for it."""
        rel = self._rel(path)
        if rel not in self.crcs:
            return False
        if _DEFERRED.get():
            return True
        key = _key(path)
        if key in _VERIFIED:
            return True
        if self.sizes.get(rel, key[2]) != key[2]:
            raise CheckpointError(f"{path} has {key[2]} bytes but mzoo.yaml recorded {self.sizes[rel]}: it is truncated "
                                  "or corrupt; re-copy it.")
        actual = f"{extents_crc([Extent(Path(path), 0, key[2])]):08x}"
        if actual != self.crcs[rel].lower():
            raise CheckpointError(f"{path} does not match the CRC-32 mzoo.yaml recorded for it: it is corrupted or "
                                  "comes from another checkpoint; re-copy it.")
        _VERIFIED.add(key)
        return True


def verify_torch_archive(path: Path, offset: int = 0, length: Optional[int] = None) -> None:
    """Check every stored record of the torch.save zip archive at [offset, offset + length) of
    `path` against the CRC-32 its central directory records (once per archive)."""
    path = Path(path)
    size = os.path.getsize(path)
    length = size - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > size:
        raise CheckpointError(f"{path} is truncated (it ends at byte {size}, before byte {offset + length}); "
                              "re-copy the checkpoint.")
    key = _key(path, offset, length)
    if key in _VERIFIED or _DEFERRED.get():
        return
    from mzoo.ckpt.dist import _Slice

    with open(path, "rb", buffering=0) as f:
        try:
            records = zipfile.ZipFile(_Slice(f, offset, length)).infolist()
            for info in records:
                f.seek(offset + info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                start = offset + info.header_offset + 30 + name_len + extra_len
                if start + info.compress_size > offset + length:
                    raise CheckpointError(f"{path} is truncated inside record {info.filename!r}; re-copy the checkpoint.")
                if info.compress_type == 0 and extents_crc([Extent(path, start, info.file_size)]) != info.CRC:
                    raise CheckpointError(f"{path}: record {info.filename!r} does not match the CRC-32 the archive "
                                          "records for it: the file is corrupted; re-copy it.")
        except (zipfile.BadZipFile, struct.error, ValueError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable torch archive ({type(e).__name__}); it is truncated "
                                  "or corrupted, re-copy it.") from None
    _VERIFIED.add(key)


def archive_problems(folder: Path, fmt: str) -> list[str]:
    """What `inspect --check` reports for a checkpoint without mzoo.yaml's CRC-32s: every torch
    archive (legacy rank files, torch_dist items) checked against the CRC-32s it records."""
    folder = Path(folder)
    items: list[tuple[Path, int, Optional[int]]] = []
    if fmt == "torch":
        items = [(p, 0, None) for p in sorted(folder.glob("mp_rank_*/model_optim_rng.pt"))]
    elif fmt == "torch_dist":
        from mzoo.ckpt.dcp_meta import BytesStorageMetadata
        from mzoo.ckpt.dist import DistReader

        reader = DistReader(folder)
        items = [(folder / info.relative_path, info.offset, info.length) for (fqn, _), info in reader.storage.items()
                 if not isinstance(reader.metadata.state_dict_metadata.get(fqn), BytesStorageMetadata)]
    problems = []
    for path, offset, length in items:
        try:
            verify_torch_archive(path, offset, length)
        except CheckpointError as e:
            problems.append(str(e))
    return problems


# ---- non-finite weights: a NaN or Inf converts, inspects and generates silently otherwise --------------
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK = 16 << 20  # bytes looked at a time: the check's memory stays bounded whatever the tensor's size


def is_finite(value: "torch.Tensor | TensorExtents") -> bool:
    """Whether every element is finite, looked at in blocks of _BLOCK bytes (tensors in memory, or
    extents of files, read through one reused buffer)."""
    if value.dtype not in _CHECKED_DTYPES:
        return True
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        step = max(1, _BLOCK // flat.element_size())
        return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))
    buf = bytearray(_BLOCK)
    for e in value.extents:
        if e.path is None:  # zeros
            continue
        with open(e.path, "rb", buffering=0) as f:
            f.seek(e.offset)
            left = e.length
            while left:
                n = f.readinto(memoryview(buf)[:min(left, _BLOCK)])
                if not n:
                    raise CheckpointError(f"{e.path} is truncated; re-copy the checkpoint.")
                n -= n % value.dtype.itemsize
                if n and not bool(torch.isfinite(torch.frombuffer(buf, dtype=value.dtype, count=n // value.dtype.itemsize)).all()):
                    return False
                left -= n
                f.seek(e.offset + e.length - left)
    return True


def nonfinite_message(name: str, where: Path, remedy: str) -> str:
    return f"{name} in {where} holds NaN or Inf values: the checkpoint is damaged or its training diverged; {remedy}."
