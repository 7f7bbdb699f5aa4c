"""Hugging Face checkpoints: sharded safetensors + index, config.json, tokenizer files.

Reading is lazy (safetensors `safe_open`, one tensor or slice at a time) and validated up front:
missing shards, truncated files and index entries that point outside the folder fail with one
sentence before any work. Writing is incremental, shard by shard.
"""

from __future__ import annotations

from mzoo.errors import UserError

import json
import re
import math
import struct
from pathlib import Path
from typing import Any, Optional

import torch

from mzoo.ckpt.sink import Budget, Extent, FileSink, TensorExtents

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(UserError):
    """A checkpoint on disk is missing, incomplete or malformed; the message says what to do."""


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and ((path / INDEX).exists() or (path / SINGLE).exists())


def read_header(file: Path) -> dict[str, Any]:
    """The safetensors JSON header, after checking that it is well formed (every tensor entry has a
    dtype, a shape and offsets that agree and lie inside the file) and that the file holds every
    byte it declares."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated (only {size} bytes); re-download or re-convert it.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file} is truncated (header needs {n} bytes, file has {size}); re-download it.")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise CheckpointError(f"{file} is not a safetensors file (unreadable header).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a safetensors file (its header is not a JSON object).")
    end = 0
    for name, meta in header.items():
        if name != "__metadata__":
            end = max(end, _check_entry(file, name, meta))
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file} is truncated: it declares {8 + n + end} bytes but has {size}; re-download or re-convert it."
        )
    return header


def _header_length(file: Path) -> int:
    with open(file, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _ints(value: Any, length: Optional[int] = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _check_entry(file: Path, name: str, meta: Any) -> int:
    """One tensor entry of a safetensors header: the end of its bytes, once its fields make sense."""
    if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and _ints(meta.get("shape"))
            and _ints(meta.get("data_offsets"), 2)):
        raise CheckpointError(f"{file} has a malformed header entry for {name!r} (it needs a dtype, a shape of "
                              "non-negative integers and two data_offsets); the file is corrupt, re-download it.")
    begin, end = meta["data_offsets"]
    if begin > end:
        raise CheckpointError(f"{file} gives {name!r} data_offsets that end before they begin ({begin} > {end}); "
                              "the file is corrupt, re-download it.")
    dtype = _TORCH_DTYPES.get(meta["dtype"])
    if dtype is not None:  # other dtypes are refused when read
        need = math.prod(meta["shape"]) * torch.empty((), dtype=dtype).element_size()
        if need != end - begin:
            raise CheckpointError(f"{file} says {name!r} is {meta['dtype']} {meta['shape']} ({need} bytes) but its "
                                  f"data_offsets span {end - begin} bytes; the file is corrupt, re-download it.")
    return end


def _in_hub_blobs(folder: Path, full: Path) -> bool:
    from mzoo.ckpt.paths import hub_blobs

    blobs = hub_blobs(folder)
    return blobs is not None and full.parent == blobs


class HFReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder; pass the folder that holds config.json.")
        if not (self.path / "config.json").exists():
            raise CheckpointError(f"{self.path} has no config.json; it is not a Hugging Face checkpoint.")
        try:
            self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        except (ValueError, RecursionError):
            raise CheckpointError(f"{self.path / 'config.json'} is not valid JSON; re-download it.") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.path / 'config.json'} is not a JSON object; re-download it.")
        self.weight_map = self._weight_map()
        self.headers: dict[str, dict[str, Any]] = {}
        root = self.path.resolve()
        for file in sorted(set(self.weight_map.values())):
            self.headers[file] = read_header(self._shard(root, file))
        for name, file in self.weight_map.items():
            if name == "__metadata__" or name not in self.headers[file]:
                raise CheckpointError(f"{INDEX} says {name} is in {file}, but it is not; the index is stale.")
        self._header_bytes = {f: _header_length(self.path / f) for f in self.headers}
        from mzoo.ckpt import mxfp4
        from mzoo.ckpt.integrity import Checksums

        self.checksums = Checksums(self.path)  # mzoo.yaml's CRC-32s, checked as each shard is first used
        self.quantization = mxfp4.quant_method(self.config, str(self.path))  # None, or "mxfp4" (others are refused)
        # MXFP4 tensors by their dequantised name; their `_blocks` / `_scales` halves are not listed
        self.packed = (mxfp4.packed_tensors(self.weight_map, self._stored_shape, self._stored_dtype, str(self.path))
                       if self.quantization else {})
        halves = {half: base for base, p in self.packed.items() for half in (p.blocks, p.scales)}
        self._halves = set(halves)
        self._names = [halves[n] if n in halves else n for n in self.weight_map
                       if n not in halves or n == self.packed[halves[n]].blocks]

    def _shard(self, root: Path, file: str) -> Path:
        """The shard file an index entry names, refused when it is not a file inside the folder."""
        try:
            full = (self.path / file).resolve()
            inside = root in full.parents or _in_hub_blobs(self.path, full)
            exists, is_file = full.exists(), full.is_file()
        except (OSError, ValueError) as e:  # a name too long, a NUL byte, a symlink loop
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CheckpointError(f"{INDEX} lists {file!r}, which cannot be opened ({reason}); "
                                  "the index is corrupt.") from None
        if not inside:
            raise CheckpointError(f"{INDEX} points outside the checkpoint folder ({file}); refusing to read it.")
        if not exists:
            raise CheckpointError(f"{self.path} is missing {file}, which {INDEX} lists; the copy is incomplete.")
        if not is_file:
            raise CheckpointError(f"{INDEX} lists {file}, which is not a file; the index is corrupt.")
        return full

    def _weight_map(self) -> dict[str, str]:
        if (self.path / INDEX).exists():
            try:
                index = json.loads((self.path / INDEX).read_text())
            except (ValueError, RecursionError):
                index = None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{self.path / INDEX} is not a valid index (no weight_map).")
            if not all(isinstance(file, str) and file for file in weight_map.values()):
                raise CheckpointError(f"{self.path / INDEX} is not a valid index (its weight_map must map tensor "
                                      "names to file names).")
            return dict(weight_map)
        if (self.path / SINGLE).exists():
            header = read_header(self.path / SINGLE)
            return {k: SINGLE for k in header if k != "__metadata__"}
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise CheckpointError(
                f"{self.path} holds pickled weights (.bin); mzoo reads safetensors only — re-save it with "
                "save_pretrained(safe_serialization=True)."
            )
        raise CheckpointError(f"{self.path} has no {SINGLE} or {INDEX}; it holds no weights mzoo can read.")

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self.packed or (name in self.weight_map and name not in self._halves)

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][name]["shape"])

    def _stored_dtype(self, name: str) -> str:
        return self.headers[self.weight_map[name]][name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.packed[name].shape if name in self.packed else self._stored_shape(name)

    def dtype(self, name: str) -> str:
        """The safetensors dtype; an MXFP4 tensor reads as BF16."""
        return "BF16" if name in self.packed else self._stored_dtype(name)

    def torch_dtype(self, name: str) -> torch.dtype:
        dtype = _TORCH_DTYPES.get(self.dtype(name))
        if dtype is None:
            raise CheckpointError(f"{name} has dtype {self.dtype(name)}, which mzoo cannot convert.")
        return dtype

    def nbytes(self, name: str) -> int:
        if name in self.packed:
            return math.prod(self.packed[name].shape) * torch.bfloat16.itemsize
        begin, end = self.headers[self.weight_map[name]][name]["data_offsets"]
        return end - begin

    def get(self, name: str) -> torch.Tensor:
        """Read with pread into a fresh buffer (not mmap): pages read do not stay in this process's
        RSS after the tensor is freed, so memory stays bounded by the tensors alive. An MXFP4
        tensor is dequantised to bf16."""
        if name in self.packed:
            from mzoo.ckpt.mxfp4 import dequantize

            packed = self.packed[name]
            return dequantize(self._read(packed.blocks), self._read(packed.scales))
        return self._read(self._check_name(name))

    def get_row(self, name: str, row: int) -> torch.Tensor:
        """Row `row` of a stacked [N, ...] tensor, read by itself (a fused expert tensor can be many GB);
        of an MXFP4 one, that expert's blocks and scales only, dequantised."""
        if name in self.packed:
            from mzoo.ckpt.mxfp4 import dequantize

            packed = self.packed[name]
            self._row_range(name, packed.shape, row)
            return dequantize(self._read(packed.blocks, row)[None], self._read(packed.scales, row)[None])[0]
        return self._read(self._check_name(name), row)

    def _check_name(self, name: str) -> str:
        if name not in self:
            from mzoo.ckpt.mxfp4 import unlabelled_hint

            hint = "" if self.quantization else unlabelled_hint(name, self.weight_map)
            raise CheckpointError(f"{self.path} has no tensor {name}{hint}; the checkpoint does not match its "
                                  "config.")
        return name

    def _row_range(self, name: str, shape: tuple[int, ...], row: int) -> None:
        if not shape or not 0 <= row < shape[0]:
            raise CheckpointError(
                f"{name} in {self.path} has shape {tuple(shape)}, so it has no row {row}; the checkpoint does "
                "not match its config."
            )

    def _read(self, name: str, row: Optional[int] = None) -> torch.Tensor:
        """A stored tensor's bytes as they are, or one row of them."""
        file = self.weight_map[name]
        meta = self.headers[file][name]
        dtype = _TORCH_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"{name} has dtype {meta['dtype']}, which mzoo cannot convert.")
        begin, end = meta["data_offsets"]
        shape = list(meta["shape"])
        if row is not None:
            self._row_range(name, tuple(shape), row)
            size = (end - begin) // shape[0]
            begin, end, shape = begin + row * size, begin + (row + 1) * size, shape[1:]
        self.checksums.verify(self.path / file)
        buf = bytearray(end - begin)
        if not buf:
            return torch.empty(shape, dtype=dtype)
        with open(self.path / file, "rb", buffering=0) as f:
            f.seek(8 + self._header_bytes[file] + begin)
            got = f.readinto(buf)
        if got != len(buf):
            raise CheckpointError(f"{self.path / file} is truncated; re-download or re-convert it.")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def extents(self, name: str) -> Optional[TensorExtents]:
        """Where tensor `name`'s bytes are, for a kernel copy (no read); None for an MXFP4 tensor,
        whose bytes are not the tensor's (it must be read, and so dequantised)."""
        if name in self.packed:
            return None
        file = self.weight_map[self._check_name(name)]
        meta = self.headers[file][name]
        begin, end = meta["data_offsets"]
        self.checksums.verify(self.path / file)
        return TensorExtents(tuple(meta["shape"]), self.torch_dtype(name),
                             (Extent(self.path / file, 8 + self._header_bytes[file] + begin, end - begin),))


def parse_size(text: str) -> int:
    """'5GB' -> bytes (decimal units as the hub uses; also KiB/MiB/GiB)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            try:
                return int(float(number) * scale)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise UserError(f"cannot read size '{text}'; write it like 5GB, 500MB or 2GiB.")


_ST_DTYPES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


_ROW = re.compile(r"^(.*)\[(\d+)\]$")


def stacked_row(name: str) -> tuple[str, Optional[int]]:
    """'a.b[3]' -> ('a.b', 3): row 3 of a stacked tensor; a plain name -> (name, None)."""
    match = _ROW.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def fold_rows(plan: list[tuple[str, tuple[int, ...], torch.dtype]]
              ) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], dict[str, int]]:
    """A plan whose rows `name[i]` (GPT-OSS's stacked experts: one canonical tensor per row) become
    one tensor [rows, ...] placed where its last row arrives, and the row count of each. The writer
    keeps a stacked tensor's rows until then: memory holds one stacked tensor (all experts of a
    layer's weight), the unit transformers itself stores."""
    last: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
    for i, (name, shape, dtype) in enumerate(plan):
        base, row = stacked_row(name)
        if row is not None:
            last[base] = (last.get(base, (0,))[0] + 1, i, tuple(shape), dtype)
    out = []
    for i, (name, shape, dtype) in enumerate(plan):
        base, row = stacked_row(name)
        if row is None:
            out.append((name, shape, dtype))
        elif last[base][1] == i:
            count, _, row_shape, kept = last[base]
            out.append((base, (count, *row_shape), kept))
    return out, {base: v[0] for base, v in last.items()}


class HFWriter:
    """Streams tensors into safetensors shards whose headers are known in advance.

    The caller gives the plan (name, shape, dtype in the order tensors will arrive, e.g. from a
    meta-device pass); headers are written first and each tensor's bytes go straight to disk from
    a writer thread (FileSink), so memory holds a tensor or two, not one shard.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 10**9):
        self.folder = Path(folder)
        plan, self.row_counts = fold_rows(plan)
        self.rows: dict[str, dict[int, torch.Tensor]] = {}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [(name, shape, dtype, i) for i, shard in enumerate(shards) for name, shape, dtype, _ in shard]
        self.shards = shards
        self.position = 0
        self.budget = Budget()
        self.sink: Optional[FileSink] = None
        self.sinks: list[FileSink] = []
        self.current = -1

    def _open(self, index: int) -> None:
        if self.sink is not None:
            self.sink.close()  # fsyncs in its own thread while the next shard fills
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[index]:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.sink = FileSink(self.folder / self.files[index], self.budget)
        self.sinks.append(self.sink)
        self.sink.write(struct.pack("<Q", len(raw)) + raw)
        self.current = index

    def add(self, name: str, tensor: torch.Tensor | TensorExtents) -> None:
        """The next planned tensor: its bytes, or extents of other files (copied by the kernel); or
        row `name[i]` of a stacked tensor, kept until its last row arrives (see fold_rows)."""
        base, row = stacked_row(name)
        if row is not None:
            self._add_row(base, row, tensor)
            return
        expected, shape, dtype, shard = self.order[self.position]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"writer expected {expected} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if shard != self.current:
            self._open(shard)
        if isinstance(tensor, TensorExtents):
            self.sink.copy(list(tensor.extents))
        else:
            self.sink.write_tensor(tensor)
        self.position += 1

    def _add_row(self, base: str, row: int, tensor: torch.Tensor | TensorExtents) -> None:
        count = self.row_counts.get(base)
        rows = self.rows.setdefault(base, {})
        if count is None or isinstance(tensor, TensorExtents) or not 0 <= row < count or row in rows:
            raise ValueError(f"writer got an unplanned row {base}[{row}]")
        rows[row] = tensor
        if len(rows) == count:
            del self.rows[base]
            self.add(base, torch.stack([rows[i] for i in range(count)]))

    def close(self) -> list[str]:
        """Wait until every shard is written and fsynced; write the index. Returns the files."""
        if self.position != len(self.order):
            raise ValueError(f"writer got {self.position} of {len(self.order)} planned tensors")
        if self.sink is None:  # an empty model: still a valid file
            self._open(0)
        for sink in self.sinks:
            sink.wait()
        if len(self.files) == 1:
            return self.files
        weight_map = {name: self.files[shard] for name, _, _, shard in self.order}
        total = sum(nbytes for shard in self.shards for *_, nbytes in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files + [INDEX]

    def abort(self) -> None:
        for sink in self.sinks:
            sink.abort()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))


def parse_dtype(text: Optional[str]) -> Optional[torch.dtype]:
    if text is None:
        return None
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if text not in table:
        raise UserError(f"unknown dtype '{text}'; use fp32, bf16 or fp16.")
    return table[text]


# Tensors every format keeps in fp32 whatever the checkpoint's dtype: DeepSeek-V3's routing bias is
# added to sigmoid scores to pick experts, and bf16 rounding would change which experts win
# (Megatron keeps router.expert_bias fp32, transformers keeps e_score_correction_bias fp32).
FP32_TENSORS = ("router.expert_bias", "gate.e_score_correction_bias")


def storage_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor `name` (canonical or Hugging Face) is stored in for a checkpoint of `dtype`."""
    return torch.float32 if name.endswith(FP32_TENSORS) else dtype
