"""torch.save's file format, written one record at a time from tensor memory (bounded memory, no copy).

torch.save pickles the whole object first, so every tensor must exist at once, and it writes
through Python file objects. Here each tensor's storage becomes a zip record as soon as it exists
(its bytes go straight from the tensor to a FileSink) and only a placeholder is kept; the pickle
(`data.pkl`, whose persistent ids name those records) can come first (one tensor: DCP items) or
last (a legacy rank file). The layout is the one PyTorch's own writer produces: records stored,
data 64-byte aligned by a "FB" padding extra field, sizes and CRC in a data descriptor after
the data (so no record is read twice), zip64 end records always, zip64 extra fields where a size
or offset needs them. Loads with `torch.load(weights_only=True)`, also with `mmap=True`.
(litgpt's incremental_save streams the same way through PyTorch's writer.)
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mzoo.ckpt.sink import Buffer, FileSink, Piece, TensorExtents, tensor_bytes

ALIGN = 64  # torch.serialization._get_storage_alignment(): records start on 64-byte boundaries
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields (tests lower it)
_FLAGS = 0x0808  # data descriptor follows the data; UTF-8 names (what PyTorch's writer sets)


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class SavedTensor:
    """Placeholder that pickles exactly like the tensor it stands for."""

    def __init__(self, ref: _StorageRef, shape: torch.Size):
        self.ref, self.shape = ref, shape

    def __reduce_ex__(self, protocol: int):
        stride = torch.empty(self.shape, device="meta").stride()
        return torch._utils._rebuild_tensor_v2, (self.ref, 0, tuple(self.shape), stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, o: Any):
        if isinstance(o, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[o.dtype])
            return ("storage", storage_type, o.key, "cpu", o.numel)
        return None


def pickle_with_refs(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@dataclass
class _Entry:
    name: bytes
    offset: int  # of the local header, from the archive's start
    size: int
    piece: Piece  # its crc is known once the sink has written it

    @property
    def zip64(self) -> bool:
        return self.size >= ZIP64_LIMIT or self.offset >= ZIP64_LIMIT


class TorchZipWriter:
    """One torch.save archive appended to a FileSink, possibly after other data (DCP packs many
    archives into one file; offsets inside an archive count from its start)."""

    def __init__(self, sink: FileSink, archive: str = "archive"):
        self.sink, self.archive = sink, archive
        self.start = sink.position
        self.entries: list[_Entry] = []
        self.count = 0  # storages written

    def record(self, name: str, data: Buffer | TensorExtents) -> None:
        """One stored record; extents are copied by the kernel."""
        full = f"{self.archive}/{name}".encode()
        offset = self.sink.position - self.start
        size = data.nbytes if isinstance(data, TensorExtents) else len(data)
        big = size >= ZIP64_LIMIT or offset >= ZIP64_LIMIT
        zip64 = struct.pack("<HHQQ", 1, 16, 0, 0) if big else b""  # sizes live in the descriptor
        fixed = 30 + len(full) + len(zip64) + 4
        pad = -(offset + fixed) % ALIGN
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        limit = 0xFFFFFFFF if big else 0
        self.sink.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if big else 0, _FLAGS, 0, 0, 0, 0, limit, limit,
                                    len(full), len(extra)) + full + extra)
        piece = self.sink.copy(list(data.extents)) if isinstance(data, TensorExtents) else self.sink.write(data)
        entry = _Entry(full, offset, size, piece)
        self.entries.append(entry)
        if big:
            self.sink.write_deferred(24, lambda: struct.pack("<IIQQ", 0x08074B50, piece.crc, size, size))
        else:
            self.sink.write_deferred(16, lambda: struct.pack("<IIII", 0x08074B50, piece.crc, size, size))

    def tensor(self, value: torch.Tensor | TensorExtents) -> SavedTensor:
        """Write the tensor's bytes now (from its memory, or copied from its extents by the kernel);
        return the placeholder to pickle."""
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous().cpu()
        key = str(self.count)
        self.count += 1
        self.record(f"data/{key}", value if isinstance(value, TensorExtents) else tensor_bytes(value))
        return SavedTensor(_StorageRef(key, value.dtype, math.prod(value.shape)), torch.Size(value.shape))

    def pickle(self, obj: Any) -> None:
        """data.pkl (`obj`, holding placeholders) and the small records torch.save puts beside it."""
        self.record("data.pkl", pickle_with_refs(obj))
        self.record(".format_version", b"1")
        self.record(".storage_alignment", str(ALIGN).encode())
        self.record("byteorder", sys.byteorder.encode())

    def finish(self) -> None:
        """The version records and the central directory (made on the writer thread: it holds CRCs)."""
        self.record("version", b"3\n")
        self.record(".data/serialization_id", uuid.uuid4().hex.encode().ljust(40, b"0"))
        entries = list(self.entries)
        central_offset = self.sink.position - self.start
        size = sum(46 + len(e.name) + (28 if e.zip64 else 0) for e in entries) + 56 + 20 + 22
        self.sink.write_deferred(size, lambda: _central_directory(entries, central_offset))


def _central_directory(entries: list[_Entry], central_offset: int) -> bytes:
    out = bytearray()
    for e in entries:
        extra = struct.pack("<HHQQQ", 1, 24, e.size, e.size, e.offset) if e.zip64 else b""
        size = 0xFFFFFFFF if e.zip64 else e.size
        offset = 0xFFFFFFFF if e.zip64 else e.offset
        out += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45 if e.zip64 else 0, 45 if e.zip64 else 0, _FLAGS, 0,
                           0, 0, e.piece.crc, size, size, len(e.name), len(extra), 0, 0, 0, 0, offset)
        out += e.name + extra
    central_size = len(out)
    end64 = central_offset + central_size
    n = len(entries)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, central_size, central_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                       min(central_size, 0xFFFFFFFF), min(central_offset, 0xFFFFFFFF), 0)
    return bytes(out)


def save_tensor(sink: FileSink, value: torch.Tensor | TensorExtents) -> tuple[int, int]:
    """torch.save(value) appended to `sink` (a DCP item); returns (offset, length) in the file."""
    if isinstance(value, torch.Tensor):
        value = value.detach().contiguous().cpu()
        data: Buffer | TensorExtents = tensor_bytes(value)
    else:
        data = value
    numel = math.prod(value.shape)
    zw = TorchZipWriter(sink)
    start = sink.position
    zw.pickle(SavedTensor(_StorageRef("0", value.dtype, numel), torch.Size(value.shape)))
    zw.record("data/0", data)
    zw.finish()
    return start, sink.position - start


class IncrementalTorchWriter:
    """A legacy rank file: tensors written as they come, the object holding them pickled last."""

    def __init__(self, path: str | Path, budget=None):
        self.path = Path(path)
        self.sink = FileSink(self.path, budget)
        self.zip = TorchZipWriter(self.sink, archive=self.path.stem)

    def tensor(self, value: torch.Tensor | TensorExtents) -> SavedTensor:
        return self.zip.tensor(value)

    def finish(self, obj: Any) -> None:
        """Pickle `obj` (holding placeholders) as data.pkl, close the archive; the file is fsynced
        in the background (`wait()` to be sure it is done)."""
        self.zip.pickle(obj)
        self.zip.finish()
        self.sink.close()

    def wait(self) -> None:
        self.sink.wait()

    def abort(self) -> None:
        self.sink.abort()
