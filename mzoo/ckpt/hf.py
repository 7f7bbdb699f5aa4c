"""Hugging Face checkpoints: sharded safetensors + index, config.json, tokenizer files.

Reading is lazy (safetensors `safe_open`, one tensor or slice at a time) and validated up front:
missing shards, truncated files and index entries that point outside the folder fail with one
sentence before any work. Writing is incremental, shard by shard.
"""

from __future__ import annotations

from mzoo.errors import UserError

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(UserError):
    """A checkpoint on disk is missing, incomplete or malformed; the message says what to do."""


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and ((path / INDEX).exists() or (path / SINGLE).exists())


def read_header(file: Path) -> dict[str, Any]:
    """The safetensors JSON header, after checking the file holds every byte it declares."""
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
        except ValueError:
            raise CheckpointError(f"{file} is not a safetensors file (unreadable header).") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file} is truncated: it declares {8 + n + end} bytes but has {size}; re-download or re-convert it."
        )
    return header


class HFReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder; pass the folder that holds config.json.")
        if not (self.path / "config.json").exists():
            raise CheckpointError(f"{self.path} has no config.json; it is not a Hugging Face checkpoint.")
        self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        self.weight_map = self._weight_map()
        self.headers: dict[str, dict[str, Any]] = {}
        root = self.path.resolve()
        for file in sorted(set(self.weight_map.values())):
            full = (self.path / file).resolve()
            if root not in full.parents:
                raise CheckpointError(f"{INDEX} points outside the checkpoint folder ({file}); refusing to read it.")
            if not full.exists():
                raise CheckpointError(f"{self.path} is missing {file}, which {INDEX} lists; the copy is incomplete.")
            self.headers[file] = read_header(full)
        for name, file in self.weight_map.items():
            if name not in self.headers[file]:
                raise CheckpointError(f"{INDEX} says {name} is in {file}, but it is not; the index is stale.")
        self._handles: dict[str, Any] = {}

    def _weight_map(self) -> dict[str, str]:
        if (self.path / INDEX).exists():
            try:
                return dict(json.loads((self.path / INDEX).read_text())["weight_map"])
            except (ValueError, KeyError):
                raise CheckpointError(f"{self.path / INDEX} is not a valid index (no weight_map).") from None
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
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.weight_map[name]][name]["shape"])

    def dtype(self, name: str) -> str:
        return self.headers[self.weight_map[name]][name]["dtype"]

    def nbytes(self, name: str) -> int:
        begin, end = self.headers[self.weight_map[name]][name]["data_offsets"]
        return end - begin

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path} has no tensor {name}; the checkpoint does not match its config.")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0, reading only those bytes."""
        return self._handle(self.weight_map[name]).get_slice(name)[start:stop]

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.weight_map)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).exists()]


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


class HFWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, then the index.

    Memory is bounded by one shard; shards get their final `model-0000i-of-0000n` names at close.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 10**9):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str], int]] = []  # (temp file, names, bytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        temp = f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(self.folder / temp), metadata={"format": "pt"})
        self.shards.append((temp, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.folder / self.shards[0][0], self.folder / SINGLE)
            return [SINGLE]
        weight_map, files = {}, []
        for i, (temp, names, _) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / temp, self.folder / final)
            weight_map.update({name: final for name in names})
            files.append(final)
        total = sum(b for _, _, b in self.shards)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX]


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
