"""Megatron-Core's "zarr" distributed-checkpoint backend, read and written with tensorstore.

Megatron-Core (strategies/zarr.py and strategies/tensorstore.py, removed in core 0.16) stored
one zarr v2 array per sharded-tensor key, in the folder `<checkpoint>/<key>`: no compressor,
no filters, fill_value null, C order, "." chunk keys, chunk shape = one rank's shard
(global shape // axis fragmentation), every chunk written (write_empty_chunks=True), and
bf16 as the dtype string "bfloat16" (zarr's "<V2" patched in .zarray). Each ShardedObject
(the linears' `_extra_state`) is torch.save(data) in `<checkpoint>/<unique key>.pt`, e.g.
`decoder.layers.mlp.linear_fc1._extra_state/shard_0_2.pt`, as megatron's common strategy saved
it; these folders hold no .zarray and the reader skips them. `metadata.json`
({"sharded_backend": "zarr", ...}) is written last and `common.pt` holds the non-tensor state.

Reading opens each array with the spec Megatron's loader used (driver "zarr", kvstore
"file") and reads only the chunks overlapping the region asked for. Writing produces the
bytes Megatron's writer did for the same chunks (.zarray included), one region at a time, so a
converter holds at most one region plus the chunks it touches. The converter's chunks are one
per layer (per expert), not Megatron's per-rank shards (docs/formats.md, "zarr").
"""

from __future__ import annotations

import json
import os
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

import numpy as np
import tensorstore as ts
import torch

from mzoo.ckpt.hf import CheckpointError

if TYPE_CHECKING:
    from mzoo.ckpt.dist import Chunk

METADATA_FILE = "metadata.json"
COMMON_FILE = "common.pt"
# What Megatron's save_config wrote for this backend (json.dump of CheckpointingConfig).
ZARR_METADATA: dict[str, Any] = {
    "sharded_backend": "zarr", "sharded_backend_version": 1,
    "common_backend": "torch", "common_backend_version": 1,
}

Index = tuple[Union[slice, int], ...]

# zarr v2 dtype strings <-> torch; "bfloat16" is the string Megatron patched into .zarray.
_TORCH_BY_ZARR: dict[str, torch.dtype] = {
    "|b1": torch.bool, "|u1": torch.uint8, "|i1": torch.int8, "<i2": torch.int16,
    "<i4": torch.int32, "<i8": torch.int64, "<f2": torch.float16, "<f4": torch.float32,
    "<f8": torch.float64, "<c8": torch.complex64, "<c16": torch.complex128, "bfloat16": torch.bfloat16,
}
_ZARR_BY_TORCH: dict[torch.dtype, str] = {v: k for k, v in _TORCH_BY_ZARR.items()}
# tensorstore's dtype names (what an opened array reports) -> torch.
_TORCH_BY_TS: dict[str, torch.dtype] = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "float16": torch.float16, "float32": torch.float32,
    "float64": torch.float64, "complex64": torch.complex64, "complex128": torch.complex128,
    "bfloat16": torch.bfloat16,
}


def is_zarr_checkpoint(path: Path) -> bool:
    """True for a finished Megatron checkpoint folder whose metadata.json names the zarr backend."""
    try:
        meta = json.loads((Path(path) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("sharded_backend") == "zarr"


def zarray_bytes(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: torch.dtype) -> bytes:
    """The .zarray exactly as zarr 2.x wrote it for Megatron (same keys, order, indentation)."""
    meta = {
        "chunks": list(chunks), "compressor": None, "dtype": _ZARR_BY_TORCH[dtype], "fill_value": None,
        "filters": None, "order": "C", "shape": list(shape), "zarr_format": 2,
    }
    # zarr.util.json_dumps: indent=4, sort_keys=True, ensure_ascii=True, separators=(",", ": ").
    text = json.dumps(meta, indent=4, sort_keys=True, ensure_ascii=True, separators=(",", ": "))
    return text.encode("ascii")


def _spec(folder: Path) -> dict[str, Any]:
    # The spec Megatron's open_ts_array used (strategies/tensorstore.py).
    return {"driver": "zarr", "metadata_key": ".zarray", "kvstore": {"driver": "file", "path": str(folder)}}


def _normalize(index: Index, shape: tuple[int, ...], what: str) -> tuple[Union[slice, int], ...]:
    """Python-style index (negative ints, open slices) -> explicit in-bounds coordinates.

    tensorstore takes a negative index literally (coordinate -1), so convert it here.
    """
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"{what} has {len(shape)} dimensions but the index has {len(index)}.")
    out: list[Union[slice, int]] = []
    for i, size in zip(index, shape):
        if isinstance(i, slice):
            start, stop, step = i.indices(size)
            if step <= 0:
                raise IndexError(f"{what}: only positive slice steps are supported, got {i}.")
            out.append(slice(start, max(start, stop), step))
        elif isinstance(i, (int, np.integer)) and not isinstance(i, bool):
            j = int(i) + size if i < 0 else int(i)
            if not 0 <= j < size:
                raise IndexError(f"{what}: index {int(i)} is out of range for a dimension of size {size}.")
            out.append(j)
        else:
            raise TypeError(f"{what}: indices must be ints or slices, got {type(i).__name__}.")
    out.extend(slice(0, size, 1) for size in shape[len(index):])
    return tuple(out)


def _chunk_names(index: tuple[Union[slice, int], ...], chunks: tuple[int, ...], sep: str) -> list[str]:
    """Names of the chunk files that a normalized index touches ("0" for a 0-d array)."""
    if not chunks:
        return ["0"]
    ranges = []
    for i, c in zip(index, chunks):
        if isinstance(i, int):
            ranges.append(range(i // c, i // c + 1))
        elif i.stop <= i.start:
            return []
        else:
            last = i.start + (len(range(i.start, i.stop, i.step)) - 1) * i.step
            ranges.append(range(i.start // c, last // c + 1))
    return [sep.join(map(str, p)) for p in product(*ranges)]


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """numpy -> torch without a float round trip, so bf16 (and NaN payloads) stay bit-exact."""
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # np.ascontiguousarray would turn a 0-d array into 1-d
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ts.bfloat16.numpy_dtype)
    return tensor.numpy()


class ZarrReader:
    """Lazy, region-wise access to the arrays of a Megatron zarr-backend checkpoint."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"{self.path} is not a folder; pass the checkpoint folder (e.g. iter_0000100)."
            )
        meta_file = self.path / METADATA_FILE
        if not meta_file.exists():
            raise CheckpointError(
                f"{self.path} has no {METADATA_FILE}, which Megatron writes last; the save did not finish or "
                "this is not a distributed checkpoint."
            )
        try:
            backend = json.loads(meta_file.read_text()).get("sharded_backend")
        except (ValueError, AttributeError):
            raise CheckpointError(f"{meta_file} is not valid JSON; the checkpoint is damaged.") from None
        if backend != "zarr":
            raise CheckpointError(
                f"{self.path} uses the {backend!r} backend, not 'zarr'; open it with that reader."
            )
        self._arrays: dict[str, ts.TensorStore] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        from mzoo.ckpt.integrity import Checksums

        self.checksums = Checksums(self.path)  # mzoo.yaml's CRC-32s, checked as each chunk is first read

    def keys(self) -> list[str]:
        """Sharded-tensor keys: folders holding a .zarray (`.sync` lock folders skipped, as Megatron did)."""
        return sorted(
            d.name for d in self.path.iterdir()
            if d.is_dir() and d.suffix != ".sync" and (d / ".zarray").is_file()
        )

    def _open(self, key: str) -> ts.TensorStore:
        if key in self._arrays:
            return self._arrays[key]
        folder = self.path / key
        if "/" in key or key in ("", ".", "..") or not (folder / ".zarray").is_file():
            raise CheckpointError(
                f"{self.path} has no array {key!r}; its keys are listed by ZarrReader.keys()."
            )
        try:
            meta = json.loads((folder / ".zarray").read_text())
            store = ts.open(_spec(folder), open=True, read=True).result()
        except (ValueError, OSError) as e:
            raise CheckpointError(
                f"array {key!r} in {self.path} cannot be opened ({_short(e)}); it is damaged."
            ) from None
        if store.dtype.name not in _TORCH_BY_TS:
            raise CheckpointError(
                f"array {key!r} has dtype {store.dtype.name}, which has no torch equivalent."
            )
        self._arrays[key], self._meta[key] = store, meta
        return store

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._open(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return _TORCH_BY_TS[self._open(key).dtype.name]

    def read(self, key: str, index: Union[Index, int, None] = ()) -> torch.Tensor:
        """Region `index` (ints and slices, numpy rules) of `key`; only overlapping chunks are read.

        A bare int picks one row of the leading (layer) axis and None the whole array, as DistReader.
        """
        store = self._open(key)
        idx = _normalize(() if index is None else index, self.shape(key), f"array {key!r}")
        self._check_chunks(key, idx)
        try:
            data = store[idx].read().result()
        except ValueError as e:
            raise CheckpointError(
                f"array {key!r} in {self.path} cannot be read ({_short(e)}); it is damaged."
            ) from None
        return _to_torch(data, self.dtype(key))

    def _check_chunks(self, key: str, idx: tuple[Union[slice, int], ...]) -> None:
        """A missing chunk would read back as zeros; Megatron wrote every chunk, so it is a partial copy."""
        meta = self._meta[key]
        sep = meta.get("dimension_separator") or "."
        folder = self.path / key
        for name in _chunk_names(idx, tuple(meta["chunks"]), sep):
            chunk = folder / name.replace("/", os.sep)
            if os.path.isfile(chunk):
                self.checksums.verify(chunk)
            elif meta.get("fill_value") is None:  # with a real fill value, absent chunks are legitimately "all fill"
                raise CheckpointError(
                    f"array {key!r} in {self.path} is missing chunk {name};"
                    " the checkpoint copy is incomplete."
                )


class ZarrWriter:
    """Creates zarr arrays exactly as Megatron's zarr strategy did and fills them region by region.

    metadata.json and common.pt are the caller's: write them after close(), metadata.json last.
    """

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._arrays: dict[str, ts.TensorStore] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def create(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, chunks: Optional[tuple[int, ...]] = None
    ) -> None:
        """New array `key`; chunks default to the whole shape (Megatron's chunk for an unsharded tensor).

        Megatron's chunk is one rank's shard (e.g. (1, ...) along a stacked layer axis); pick
        chunks no larger than the regions you write so memory stays bounded.
        """
        if not key or "/" in key or os.sep in key or key in (".", "..") or key.endswith(".sync"):
            raise ValueError(f"{key!r} cannot be a zarr array folder name.")
        if dtype not in _ZARR_BY_TORCH:
            raise ValueError(f"dtype {dtype} cannot be stored in a zarr checkpoint.")
        shape = tuple(int(n) for n in shape)
        chunks = shape if chunks is None else tuple(int(c) for c in chunks)
        if len(chunks) != len(shape) or any(c < 0 for c in chunks) or any(n < 0 for n in shape):
            raise ValueError(f"chunks {chunks} do not fit shape {shape}.")
        chunks = tuple(max(1, c) for c in chunks)  # zarr needs chunk sizes >= 1, even for empty axes
        folder = self.folder / key
        if (folder / ".zarray").exists() or key in self._arrays:
            raise CheckpointError(f"array {folder} already exists; write into an empty folder.")
        folder.mkdir(exist_ok=True)
        (folder / ".zarray").write_bytes(zarray_bytes(shape, chunks, dtype))
        # store_data_equal_to_fill_value mirrors zarr's write_empty_chunks=True: an all-zero chunk
        # is still written, so a missing chunk file always means an incomplete checkpoint.
        spec = {**_spec(folder), "store_data_equal_to_fill_value": True}
        self._arrays[key] = ts.open(spec, open=True, read=True, write=True).result()
        self._dtypes[key] = dtype

    def write(self, key: str, index: Index, tensor: torch.Tensor) -> None:
        """Write `tensor` into the region `index` of `key` and commit it to disk before returning."""
        if key not in self._arrays:
            raise KeyError(f"array {key!r} was not created by this writer; call create() first.")
        if tensor.dtype != self._dtypes[key]:
            raise TypeError(
                f"array {key!r} holds {self._dtypes[key]}, got a {tensor.dtype} tensor; convert it first."
            )
        store = self._arrays[key]
        idx = _normalize(index, tuple(int(n) for n in store.shape), f"array {key!r}")
        region = store[idx]
        if tuple(region.shape) != tuple(tensor.shape):
            raise ValueError(
                f"array {key!r}: region {tuple(region.shape)} does not match tensor {tuple(tensor.shape)}."
            )
        region.write(_to_numpy(tensor)).commit.result()

    def close(self) -> None:
        """Release the arrays after checking every chunk was written (Megatron's readers expect all)."""
        for key, store in self._arrays.items():
            chunks = tuple(json.loads((self.folder / key / ".zarray").read_text())["chunks"])
            whole = _normalize((), tuple(int(n) for n in store.shape), key)
            names = _chunk_names(whole, chunks, ".")
            missing = [n for n in names if not (self.folder / key / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"array {key!r} has {len(missing)} of {len(names)} chunks never written"
                    f" (first: {missing[0]}); write every region before close()."
                )
        self._arrays.clear()

    def __enter__(self) -> "ZarrWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._arrays.clear()


class ZarrCheckpoint(ZarrReader):
    """A ZarrReader plus the checkpoint's common state (common.pt), what the converter pipeline reads."""

    def __init__(self, path: Union[str, Path], trust_pickle: bool = False):
        super().__init__(path)
        from mzoo.ckpt.safe_pickle import torch_load

        from mzoo.ckpt.integrity import verify_torch_archive

        common = self.path / COMMON_FILE
        if common.exists() and not self.checksums.verify(common):
            verify_torch_archive(common)
        self.common: Any = torch_load(common, trust_pickle) if common.exists() else {}


def write_checkpoint(
    folder: Path,
    chunks: Iterable["Chunk"],
    common: dict[str, Any],
    on_item: Callable[[int], None] = lambda n: None,
    objects: Optional[dict[str, Any]] = None,
) -> None:
    """A whole zarr-backend checkpoint from dist.Chunk pieces, one piece in memory at a time.

    Each key's zarr chunk is its pieces' shape (Megatron's one-chunk-per-shard layout); then the
    ShardedObjects (the decoder's `_extra_state`, which megatron's default strictness requires,
    plus `objects`: unique key -> data), common.pt, and metadata.json last, as Megatron's save did.
    """
    from mzoo.ckpt.dist import extra_state_objects

    chunks = list(chunks)
    pieces: dict[str, list[Chunk]] = {}
    for c in chunks:
        pieces.setdefault(c.key, []).append(c)
    with ZarrWriter(folder) as writer:
        for key, group in pieces.items():
            first = group[0]
            same = all(tuple(c.shape) == tuple(first.shape) for c in group)
            writer.create(key, tuple(first.global_shape), first.dtype, tuple(first.shape) if same else None)
            for c in group:
                value = c.produce().to(c.dtype)
                if tuple(value.shape) != tuple(c.shape):
                    raise ValueError(
                        f"{key}: produced shape {tuple(value.shape)}, expected {tuple(c.shape)}."
                    )
                writer.write(key, tuple(slice(o, o + n) for o, n in zip(c.offsets, c.shape)), value)
                on_item(value.numel() * value.element_size())
                del value
    for key, data in {**extra_state_objects(chunks), **(objects or {})}.items():
        save_object(folder, key, data)
    torch.save(common, Path(folder) / COMMON_FILE)
    (Path(folder) / METADATA_FILE).write_text(json.dumps(ZARR_METADATA))


def save_object(folder: Path, unique_key: str, data: Any) -> None:
    """One ShardedObject as megatron's TorchCommonSaveStrategy saved it: torch.save(data) to
    `<folder>/<key>/shard_<offsets>_<shape>.pt` (its unique key plus .pt)."""
    key, _, shard = unique_key.partition("/")
    if not key or key in (".", "..") or not shard.startswith("shard_") or "/" in shard:
        raise ValueError(f"{unique_key!r} is not a ShardedObject key (<key>/shard_<offsets>_<shape>).")
    path = Path(folder) / key / f"{shard}.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(data, path)


def _short(e: BaseException) -> str:
    """tensorstore's message without its long JSON spec suffix."""
    return str(e).split(" [tensorstore_spec=")[0].split(" [source locations=")[0]
