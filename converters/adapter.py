"""The family adapter interface and its registry (by mzoo family and by HF model_type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch

from mzoo.config import ConfigError, ModelConfig
from mzoo.converters.mapping import MappingTable


@dataclass(frozen=True)
class Adapter:
    """Everything family-specific about Hugging Face <-> canonical conversion."""

    family: str
    model_type: str  # HF config.json model_type
    architecture: str  # HF architectures[0]
    table: MappingTable
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]  # -> config.json contents

    registry: ClassVar[dict[str, "Adapter"]] = {}

    def to_hf(self, canonical: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs made from one canonical tensor."""
        mapping, names = self._resolve(canonical)
        for role, value in mapping.to_hf(tensor, cfg).items():
            yield names[role], value

    def to_canonical(self, canonical: str, read: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        """The canonical tensor, reading the HF tensors it is made of through `read(name)`."""
        mapping, names = self._resolve(canonical)
        return mapping.to_canonical({role: read(name) for role, name in names.items()}, cfg)

    def _resolve(self, canonical: str):
        found = self.table.resolve(canonical)
        if found is None:
            raise ConfigError(f"the {self.family} adapter has no Hugging Face name for {canonical}.")
        return found


def register(adapter: Adapter) -> Adapter:
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
