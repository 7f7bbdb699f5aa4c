"""The family adapter interface and its registry (by mzoo family and by HF model_type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch

from mzoo.ckpt.hf import CheckpointError, HFReader
from mzoo.ckpt.sink import TensorExtents
from mzoo.config import ConfigError, ModelConfig
from mzoo.converters.mapping import Mapping, MappingTable, row_of

Read = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Adapter:
    """Everything family-specific about Hugging Face <-> canonical conversion."""

    family: str
    model_type: str  # HF config.json model_type
    table: MappingTable
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]  # -> config.json contents

    registry: ClassVar[dict[str, "Adapter"]] = {}

    def to_hf(self, canonical: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs made from one canonical tensor (always the first, written spelling)."""
        mapping, names = self._resolve(canonical)[0]
        for role, value in mapping.to_hf(tensor, cfg).items():
            yield names[role], value

    def to_canonical(
        self, canonical: str, read: Read, cfg: ModelConfig, exists: Optional[Callable[[str], bool]] = None
    ) -> torch.Tensor:
        """The canonical tensor, reading the HF tensors it is made of through `read(name)`.

        When the table accepts several spellings (per-expert tensors or the fused in-memory ones),
        the first one present in the checkpoint is read; presence comes from `exists`, or from the
        reader `read` is a method of (HFReader), or else from trying each spelling in turn."""
        options = self._resolve(canonical)
        exists = exists or _exists_of(read)
        if len(options) > 1 and exists is not None:
            present = [o for o in options if all(exists(row_of(n)[0]) for n in o[1].values())]
            options = present[:1] or options[:1]
        first_error: Optional[Exception] = None
        for mapping, names in options:
            try:
                parts = {role: _read(read, name) for role, name in names.items()}
            except (LookupError, CheckpointError) as e:  # this spelling is absent: try the next
                first_error = first_error or e
                continue
            return mapping.to_canonical(parts, cfg)
        raise first_error

    def extents(self, canonical: str, reader: HFReader, cfg: ModelConfig) -> Optional[TensorExtents]:
        """The canonical tensor as extents of the reader's files (see Mapping.extents), or None when
        it must be read and made: rows of fused tensors, transposes, or parts that do not fit."""
        options = self._resolve(canonical)
        present = [o for o in options if all(n in reader for n in o[1].values())]
        if not present:
            return None
        mapping, names = present[0]
        parts = {role: reader.extents(name) for role, name in names.items()}
        if any(p is None for p in parts.values()):
            return None  # stored quantised: read and dequantised instead
        try:
            out = mapping.extents(parts, cfg)
        except ValueError:
            return None
        if out is None or out.nbytes != sum(p.nbytes for p in parts.values()):
            return None  # not every byte used once: the read path says what is wrong
        return out

    def hf_extents(self, canonical: str, tensor: TensorExtents,
                   cfg: ModelConfig) -> Optional[list[tuple[str, TensorExtents]]]:
        """to_hf on extents: (HF name, extents) pairs, or None when the tensor must be read."""
        mapping, names = self._resolve(canonical)[0]
        try:
            parts = mapping.hf_extents(tensor, cfg)
        except ValueError:
            return None
        if parts is None or sum(p.nbytes for p in parts.values()) != tensor.nbytes:
            return None
        return [(names[role], value) for role, value in parts.items()]

    def _resolve(self, canonical: str) -> list[tuple[Mapping, dict[str, str]]]:
        found = self.table.candidates(canonical)
        if not found:
            raise ConfigError(f"the {self.family} adapter has no Hugging Face name for {canonical}.")
        return found


def _exists_of(read: Read) -> Optional[Callable[[str], bool]]:
    """`name in reader` when `read` is a bound method of a reader that can tell."""
    owner = getattr(read, "__self__", None)
    return owner.__contains__ if owner is not None and hasattr(type(owner), "__contains__") else None


def _read(read: Read, name: str) -> torch.Tensor:
    """One HF tensor, or one row `name[i]` of a stacked one (an HFReader reads only that row's bytes)."""
    base, row = row_of(name)
    if row is None:
        return read(name)
    owner = getattr(read, "__self__", None)
    if isinstance(owner, HFReader):
        return read_row(owner, base, row)
    return read(base)[row].clone()


def read_row(reader: HFReader, name: str, row: int) -> torch.Tensor:
    """Row `row` of a stored [N, ...] tensor, read by itself (a fused expert tensor can be many GB)."""
    return reader.get_row(name, row)


def register(adapter: Adapter, as_family: bool = True) -> Adapter:
    """Make `adapter` the one for its HF model_type and (unless as_family is False, when several
    model types share a family) the one for its mzoo family."""
    if as_family:
        Adapter.registry[adapter.family] = adapter
    Adapter.registry[adapter.model_type] = adapter
    return adapter


def for_family(family: str) -> Adapter:
    if family not in Adapter.registry:
        known = sorted({a.family for a in Adapter.registry.values()})
        raise ConfigError(f"no Hugging Face adapter for family '{family}' yet; supported: {', '.join(known)}.")
    return Adapter.registry[family]


def for_hf_config(hf: dict[str, Any]) -> Adapter:
    model_type = hf.get("model_type")
    if model_type not in Adapter.registry:
        known = sorted({a.model_type for a in Adapter.registry.values()})
        raise ConfigError(
            f"config.json has model_type '{model_type}', which mzoo cannot convert yet; supported: {', '.join(known)}."
        )
    return Adapter.registry[model_type]
