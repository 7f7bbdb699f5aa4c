"""Megatron-Core's "torch_dist" format: PyTorch DCP files holding GLOBAL tensors.

    iter_0000100/  __0_0.distcp ...  .metadata  common.pt  metadata.json (written last)

Homogeneous layer stacks are stored stacked: `decoder.layers.<suffix>` has a leading layer axis.
Writing produces each layer's tensor only when its turn comes, so memory stays bounded by a few
tensors (see write_dist). Reading parses the metadata with a restricted unpickler and reads only the chunks that
overlap the requested layer.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mzoo.ckpt import dcp_meta
from mzoo.ckpt.atomic import atomic_write_bytes
from mzoo.ckpt.dcp_meta import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                TensorProperties, TensorStorageMetadata, _StorageInfo)
from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.integrity import Checksums, verify_torch_archive
from mzoo.ckpt.megatron.names import extra_state_name
from mzoo.ckpt.safe_pickle import load_dcp_metadata, torch_load
from mzoo.ckpt.sink import Budget, Extent, FileSink, TensorExtents
from mzoo.ckpt.torch_zip import save_tensor

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
COMMON = "common.pt"
COMMON_OBJECT = "common_state/shard_0_1"  # megatron-core >= 0.17 keeps the common state in DCP


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor: `produce()` makes it when DCP asks."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    prepend: int = 0  # leading axes that index layers / experts (megatron's prepended sharding axes)
    extents: Optional[Callable[[], Optional[TensorExtents]]] = None  # where its bytes already are, if anywhere


def extra_state_objects(chunks: list[Chunk]) -> dict[str, Any]:
    """The `_extra_state` ShardedObjects megatron-core saves for every linear of the decoder, by
    unique key, with their data: None, what its linears' get_extra_state returns. Its default load
    strictness requires them, in torch_dist and zarr alike. The key carries the chunk's prepended axes:
    `<module>._extra_state/shard_<layer>_<L>` (stacked), `shard_<layer>.<expert>_<L>.<E>` (stacked
    experts), `shard_<expert>_<E>` (per-layer experts), `shard_0_1` (per-layer keys)."""
    out = {}
    for c in chunks:
        extra = extra_state_name(c.key)
        if c.key.startswith("decoder.layers.") and extra:
            offsets, shape = (c.offsets[: c.prepend], c.global_shape[: c.prepend]) if c.prepend else ((0,), (1,))
            out[f"{extra}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"] = None
    return out


FILE_BYTES = 512 << 20  # a new .distcp file starts past this size: a closed file's fsync overlaps the next


def write_dist(folder: Path, chunks: list[Chunk], common: dict[str, Any],
               on_item: Callable[[int], None] = lambda n: None, objects: Optional[dict[str, Any]] = None) -> None:
    """Write a torch_dist checkpoint into the (empty) iteration folder; metadata.json last.
    `objects`: further ShardedObjects, unique key -> data; DCP holds each as megatron's torch_dist
    strategy saves it, torch.save([data]) (the decoder's `_extra_state` ones are added here).

    The files are what DCP's FileSystemWriter writes (`__0_<n>.distcp` holding one torch.save
    archive per item, a pickled `Metadata` in `.metadata`), but each item is produced only when
    its turn comes and its bytes go straight from the tensor to a writer thread, packed into a few
    large files instead of one file per item: DCP's writer costs 4x a copy here (a Python file
    object per item, a CRC pass inside torch.save, one fsync per item)."""
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    sinks: list[FileSink] = []
    budget = Budget()

    def sink() -> FileSink:
        if not sinks or sinks[-1].position >= FILE_BYTES:
            if sinks:
                sinks[-1].close()  # fsyncs in its own thread while the next file fills
            sinks.append(FileSink(folder / f"__0_{len(sinks)}.distcp", budget))
        return sinks[-1]

    def stored(index: Any, out: FileSink, span: tuple[int, int]) -> None:
        storage[index] = _StorageInfo(out.path.name, span[0], span[1])

    try:
        for c in chunks:
            where = c.extents() if c.extents is not None else None
            if where is not None and where.dtype == c.dtype and tuple(where.shape) == c.shape:
                value: torch.Tensor | TensorExtents = where
            else:
                value = c.produce().to(c.dtype).contiguous()
                if tuple(value.shape) != c.shape:
                    raise ValueError(f"{c.key}: produced shape {tuple(value.shape)}, expected {c.shape}")
            meta = state.setdefault(c.key, TensorStorageMetadata(TensorProperties(dtype=c.dtype),
                                                                 torch.Size(c.global_shape), []))
            meta.chunks.append(ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.shape)))
            out = sink()
            stored(MetadataIndex(c.key, torch.Size(c.offsets), 0), out, save_tensor(out, value))
            on_item(value.nbytes)
            del value
        for key, data in {**extra_state_objects(chunks), **(objects or {})}.items():
            buf = io.BytesIO()
            torch.save([data], buf)
            out = sink()
            state[key] = BytesStorageMetadata()
            stored(MetadataIndex(key), out, (out.position, len(buf.getbuffer())))
            out.write(buf.getvalue())
        for out in sinks:
            out.wait()
    except BaseException:
        for out in sinks:
            out.abort()
        raise
    metadata = Metadata(state_dict_metadata=state, planner_data={}, storage_data=storage,
                        storage_meta=StorageMeta(checkpoint_id=None, save_id=uuid.uuid4().hex), version="1.0.0")
    atomic_write_bytes(folder / ".metadata", dcp_meta.dumps(metadata))
    torch.save(common, folder / COMMON)
    (folder / "metadata.json").write_text(json.dumps(METADATA_JSON))


def is_dist_checkpoint(folder: Path) -> Optional[str]:
    """The sharded backend named by metadata.json ('torch_dist', 'zarr'), or None."""
    meta = Path(folder) / "metadata.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("sharded_backend")
    except ValueError:
        raise CheckpointError(f"{meta} is not valid JSON; the checkpoint is damaged.") from None


_ZIP_HEAD, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"


def _check_archive_bounds(path: Path, fqn: str, offset: int, length: int) -> None:
    """Without mzoo.yaml's CRC-32s: a torch.save'd item must begin and end where .metadata says (8 bytes
    read), so a .distcp of another model is refused at open, before any tensor is read; the items'
    own CRC-32s are checked as they are read."""
    with open(path, "rb", buffering=0) as f:
        head = os.pread(f.fileno(), 4, offset)
        end = os.pread(f.fileno(), 4, offset + length - 22) if length >= 22 else b""
    if head != _ZIP_HEAD or end != _ZIP_END:
        raise CheckpointError(f"{path} holds no torch archive where .metadata places {fqn} (bytes {offset}-"
                              f"{offset + length}): the file comes from another checkpoint or is corrupted; "
                              "re-copy it.")


class DistReader:
    """Region reads from a torch_dist checkpoint written by mzoo or by megatron-core."""

    def __init__(self, folder: str | Path, trust_pickle: bool = False):
        self.folder = Path(folder)
        self.trust_pickle = trust_pickle
        if is_dist_checkpoint(self.folder) != "torch_dist":
            raise CheckpointError(f"{self.folder} has no metadata.json naming torch_dist; the save did not finish.")
        if not (self.folder / ".metadata").exists():
            raise CheckpointError(f"{self.folder} has no DCP .metadata file; the checkpoint is incomplete.")
        self.metadata = load_dcp_metadata(self.folder / ".metadata", trust_pickle)
        if not isinstance(self.metadata, Metadata):
            raise CheckpointError(f"{self.folder / '.metadata'} holds a {type(self.metadata).__name__}, not DCP "
                                  "metadata; the checkpoint is corrupt.")
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if not isinstance(v, BytesStorageMetadata)}
        self.objects = [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        self.storage = {}
        for index, info in self.metadata.storage_data.items():
            self.storage[(index.fqn, tuple(index.offset) if index.offset is not None else None)] = info
        sizes: dict[str, int] = {}
        self.checksums = Checksums(self.folder)
        for (fqn, _), info in self.storage.items():
            path = self.folder / info.relative_path
            if info.relative_path not in sizes:
                if not path.is_file():
                    raise CheckpointError(f"{self.folder} is missing {info.relative_path}; the copy is incomplete.")
                sizes[info.relative_path] = path.stat().st_size
            if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[info.relative_path]:
                raise CheckpointError(f"{path} is truncated: it ends at byte {sizes[info.relative_path]}, but "
                                      f".metadata places an item up to byte {info.offset + info.length}; re-copy it.")
            if fqn in self.tensors and not self.checksums.covers(path):
                _check_archive_bounds(path, fqn, info.offset, info.length)
        self.common = self._common()

    def _verify(self, info: Any, archive: bool = True) -> None:
        """The item's file against mzoo.yaml's CRC-32, else (a torch.save'd item) its archive's own."""
        path = self.folder / info.relative_path
        if not self.checksums.verify(path) and archive:
            verify_torch_archive(path, info.offset, info.length)

    def _common(self) -> dict[str, Any]:
        if (self.folder / COMMON).exists():
            if not self.checksums.verify(self.folder / COMMON):
                verify_torch_archive(self.folder / COMMON)
            return torch_load(self.folder / COMMON, self.trust_pickle)
        if COMMON_OBJECT not in self.objects:
            return {}
        # megatron-core >= 0.17: the common state is a ShardedObject of shape (1,) holding [state]
        loaded = torch_load(io.BytesIO(self._bytes(COMMON_OBJECT)), self.trust_pickle)
        if not (isinstance(loaded, list) and len(loaded) == 1 and isinstance(loaded[0], dict)):
            raise CheckpointError(f"{self.folder}: {COMMON_OBJECT} holds a {type(loaded).__name__}, not megatron-core's "
                                  "[common state]; the checkpoint is damaged or from an unknown release.")
        return loaded[0]

    def _bytes(self, key: str) -> bytes:
        info = next(v for (fqn, _), v in self.storage.items() if fqn == key)
        self._verify(info, archive=False)  # DCP stores objects as raw bytes: no archive CRC of their own
        with open(self.folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, index: int | tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole global tensor, or the sub-tensor at `index` of its leading (layer, expert) axes;
        only the stored chunks that overlap it are read."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.folder} has no tensor {key}; the checkpoint does not match its config.")
        meta = self.tensors[key]
        shape = tuple(meta.size)
        lead = () if index is None else (index,) if isinstance(index, int) else tuple(index)
        k = len(lead)
        if not all(0 <= i < n for i, n in zip(lead, shape)) or k > len(shape):
            raise CheckpointError(f"{key} has shape {shape} in {self.folder}; index {lead} is out of range.")
        chunks = _overlapping(meta.chunks, lead)

        def at(chunk: Any) -> tuple[int, ...]:
            return tuple(i - o for i, o in zip(lead, chunk.offsets))

        whole = _whole(chunks, shape, k)
        if whole is not None:  # one stored chunk holds the whole request: no second buffer
            return self._chunk(key, whole)[at(whole)]
        out = torch.empty(shape[k:], dtype=meta.properties.dtype)
        for c in chunks:
            region = tuple(slice(o, o + n) for o, n in zip(c.offsets[k:], c.sizes[k:]))
            out[region] = self._chunk(key, c)[at(c)]
        return out

    def extents(self, key: str, index: int | tuple[int, ...] | None = None) -> Optional[TensorExtents]:
        """What `read(key, index)` returns, as extents of the files (for a kernel copy), when one
        stored chunk holds all of it as a plain tensor; else None (read it)."""
        meta = self.tensors.get(key)
        if meta is None:
            return None
        shape = tuple(meta.size)
        lead = () if index is None else (index,) if isinstance(index, int) else tuple(index)
        k = len(lead)
        c = _whole(_overlapping(meta.chunks, lead), shape, k)
        if c is None:
            return None
        info = self.storage.get((key, tuple(c.offsets)))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        path = self.folder / info.relative_path
        self._verify(info)
        with open(path, "rb", buffering=0) as f:
            layout = _saved_tensor_layout(f, info.offset, info.length)
        if layout is None or math.prod(layout[1]) != math.prod(c.sizes):
            return None
        dtype, _, start = layout
        inner = math.prod(shape[k:]) * dtype.itemsize
        at = 0
        for i, o, n in zip(lead, c.offsets, c.sizes):  # row-major position of `lead` inside the chunk
            at = at * n + (i - o)
        if start + (at + 1) * inner > os.path.getsize(path):
            raise CheckpointError(f"{path} is truncated; re-copy the checkpoint.")
        return TensorExtents(shape[k:], dtype, (Extent(path, start + at * inner, inner),))

    def _chunk(self, key: str, chunk: Any) -> torch.Tensor:
        info = self.storage.get((key, tuple(chunk.offsets)))
        if info is None:
            raise CheckpointError(f"{self.folder}: no stored data for {key} at {tuple(chunk.offsets)}; the checkpoint is damaged.")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{key} is stored with transforms {info.transform_descriptors}, which mzoo cannot read yet.")
        self._verify(info)
        direct = read_saved_tensor(self.folder / info.relative_path, info.offset, info.length)
        if direct is not None:
            return direct.reshape(tuple(chunk.sizes)) if tuple(direct.shape) != tuple(chunk.sizes) else direct
        with open(self.folder / info.relative_path, "rb", buffering=0) as f:
            f.seek(info.offset)
            data = f.read(info.length)  # bytes: BytesIO shares them without a copy
        if len(data) != info.length:
            raise CheckpointError(f"{self.folder / info.relative_path} is truncated; re-copy the checkpoint.")
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        del data
        return tensor.reshape(tuple(chunk.sizes)) if tuple(tensor.shape) != tuple(chunk.sizes) else tensor


def _overlapping(chunks: list[Any], lead: tuple[int, ...]) -> list[Any]:
    """The stored chunks that hold part of the sub-tensor at `lead` (leading-axis indices)."""
    return [c for c in chunks if all(o <= i < o + n for i, o, n in zip(lead, c.offsets, c.sizes))]


def _whole(chunks: list[Any], shape: tuple[int, ...], k: int) -> Optional[Any]:
    """The one chunk among `chunks` that spans every axis after the first k, if any."""
    for c in chunks:
        if tuple(c.offsets[k:]) == (0,) * (len(shape) - k) and tuple(c.sizes[k:]) == shape[k:]:
            return c
    return None


# ---- reading one torch.save'd tensor straight into its final buffer --------------------------------
class _Slice(io.RawIOBase):
    """A read-only window [offset, offset + length) of a file, for zipfile."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


class _TensorMeta(pickle.Unpickler):
    """Reads the dtype, size and stride of the single tensor in a torch.save pickle, constructing
    nothing but plain tuples (no arbitrary code)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        _, storage_type, key, _, numel = pid
        return (storage_type, key, numel)


_STORAGE_DTYPES = {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


def _saved_tensor_layout(f, offset: int, length: int) -> Optional[tuple[torch.dtype, tuple[int, ...], int]]:
    """(dtype, size, absolute offset of its bytes) of the single contiguous, uncompressed tensor a
    torch.save'd item at [offset, offset + length) holds, or None when it holds anything else."""
    try:
        z = zipfile.ZipFile(_Slice(f, offset, length))
        entries = {i.filename.split("/", 1)[-1]: i for i in z.infolist()}
        records = [k for k in entries if k.startswith("data/")]
        if "data.pkl" not in entries or len(records) != 1 or entries[records[0]].compress_type != 0:
            return None
        meta = _TensorMeta(io.BytesIO(z.read(entries["data.pkl"]))).load()
        if not (isinstance(meta, tuple) and meta and meta[0] == "tensor"):
            return None
        _, (storage_type, key, numel), storage_offset, size, stride = meta
        dtype = _STORAGE_DTYPES.get(storage_type)
        contiguous = torch.empty(size, device="meta").stride() == stride
        info = entries.get(f"data/{key}")
        if dtype is None or storage_offset or not contiguous or info is None:
            return None
        if info.file_size != math.prod(size) * dtype.itemsize:
            return None
        f.seek(offset + info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        return dtype, tuple(size), offset + info.header_offset + 30 + name_len + extra_len
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError, struct.error):
        return None


def read_saved_tensor(path: Path, offset: int, length: int) -> Optional[torch.Tensor]:
    """The tensor of a torch.save'd item at [offset, offset + length) of `path`, read once straight
    into its own buffer (no bytes copy, no second buffer), or None when the item is anything but a
    single contiguous, uncompressed tensor (the caller then uses torch.load)."""
    with open(path, "rb", buffering=0) as f:
        layout = _saved_tensor_layout(f, offset, length)
        if layout is None:
            return None
        dtype, size, start = layout
        out = torch.empty(size, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        f.seek(start)
        if nbytes and f.readinto(out.reshape(-1).view(torch.uint8).numpy()) != nbytes:
            raise CheckpointError(f"{path} is truncated; re-copy the checkpoint.")
        return out
