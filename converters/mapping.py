"""Declarative name/layout mappings between Hugging Face tensors and canonical tensors.

A family adapter is a table of these (the Megatron-Bridge style): each entry names one canonical
tensor pattern, the Hugging Face tensor(s) it is made of, and a small typed transform in both
directions. Each `*` in a canonical pattern stands for a number (the global layer index, then the
global expert index); the HF patterns take the same numbers in the same order. An HF pattern
ending in `[*]` names one row of a stacked tensor (e.g. expert e of a fused [E, ...] tensor).
Several entries may share a canonical pattern: the first is the spelling written, the others are
spellings also accepted on read. Nothing here knows how tensors split over TP: that comes from the
model's ShardSpecs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping as TMapping, Optional

import torch

from mzoo.ckpt.sink import TensorExtents, cat_rows
from mzoo.config import ModelConfig

Tensors = dict[str, torch.Tensor]
Extents = dict[str, TensorExtents]


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


@dataclass(frozen=True)
class Mapping:
    """canonical <- one HF tensor, unchanged."""

    canonical: str
    hf: TMapping[str, str]  # role -> HF name pattern

    def to_canonical(self, parts: Tensors, cfg: ModelConfig) -> torch.Tensor:
        return parts["x"]

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> Tensors:
        return {"x": tensor}

    def extents(self, parts: Extents, cfg: ModelConfig) -> Optional[TensorExtents]:
        """to_canonical as byte extents of the HF files (a kernel copy, no read), or None when the
        transform moves bytes finer than rows (a transpose): then the tensor is read and made.
        A subclass that changes to_canonical without saying how its extents go gets None."""
        if type(self).to_canonical is not Mapping.to_canonical:
            return None
        return parts["x"]

    def hf_extents(self, tensor: TensorExtents, cfg: ModelConfig) -> Optional[Extents]:
        """to_hf on extents (the way back), or None; as `extents`, only where the class says how."""
        if type(self).to_hf is not Mapping.to_hf:
            return None
        return {"x": tensor}


def Direct(canonical: str, hf: str) -> Mapping:
    return Mapping(canonical, {"x": hf})


@dataclass(frozen=True)
class Transposed(Mapping):
    """GPT-2's Conv1D stores weights [in, out]; canonical linears are [out, in]."""

    def to_canonical(self, parts, cfg):
        return parts["x"].t().contiguous()

    def to_hf(self, tensor, cfg):
        return {"x": tensor.t().contiguous()}


def _group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[q; k; v] (rows) -> per query group [q heads of g; k_g; v_g] (Megatron's layout)."""
    g, d = cfg.groups, cfg.kv_channels
    per = cfg.num_attention_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, per * d, *tail)
    k = k.reshape(g, d, *tail)
    v = v.reshape(g, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _group_qkv_extents(q: TensorExtents, k: TensorExtents, v: TensorExtents, cfg: ModelConfig) -> TensorExtents:
    """_group_qkv on extents: per query group, its q rows, then its k rows, then its v rows."""
    g, d = cfg.groups, cfg.kv_channels
    per = cfg.num_attention_heads // g
    blocks = []
    for i in range(g):
        blocks += [q.rows(i * per * d, per * d), k.rows(i * d, d), v.rows(i * d, d)]
    return cat_rows(blocks)


def _ungroup_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = cfg.groups, cfg.kv_channels
    per = cfg.num_attention_heads // g
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *tail)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous())


@dataclass(frozen=True)
class QKV(Mapping):
    """Separate q/k/v projections (weights or biases) <-> the grouped fused QKV."""

    def to_canonical(self, parts, cfg):
        return _group_qkv(parts["q"], parts["k"], parts["v"], cfg)

    def extents(self, parts, cfg):
        return _group_qkv_extents(parts["q"], parts["k"], parts["v"], cfg)

    def hf_extents(self, tensor, cfg):
        g, d = cfg.groups, cfg.kv_channels
        per = cfg.num_attention_heads // g
        block = (per + 2) * d
        q = [tensor.rows(i * block, per * d) for i in range(g)]
        k = [tensor.rows(i * block + per * d, d) for i in range(g)]
        v = [tensor.rows(i * block + per * d + d, d) for i in range(g)]
        return {"q": cat_rows(q), "k": cat_rows(k), "v": cat_rows(v)}

    def to_hf(self, tensor, cfg):
        q, k, v = _ungroup_qkv(tensor, cfg)
        return {"q": q, "k": k, "v": v}


@dataclass(frozen=True)
class FusedQKV(Mapping):
    """One HF tensor holding [q; k; v] (GPT-2 c_attn, optionally Conv1D-transposed)."""

    transposed: bool = False

    def to_canonical(self, parts, cfg):
        x = parts["x"].t() if self.transposed else parts["x"]
        q, k, v = x.split([cfg.num_attention_heads * cfg.kv_channels] + [cfg.groups * cfg.kv_channels] * 2, dim=0)
        return _group_qkv(q, k, v, cfg)

    def to_hf(self, tensor, cfg):
        fused = torch.cat(_ungroup_qkv(tensor, cfg), dim=0)
        return {"x": fused.t().contiguous() if self.transposed else fused}


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """gate_proj + up_proj <-> linear_fc1 as [gate; up]."""

    def to_canonical(self, parts, cfg):
        return torch.cat([parts["gate"], parts["up"]], dim=0)

    def extents(self, parts, cfg):
        return cat_rows([parts["gate"], parts["up"]])

    def hf_extents(self, tensor, cfg):
        half = tensor.shape[0] // 2
        return {"gate": tensor.rows(0, half), "up": tensor.rows(half, half)}

    def to_hf(self, tensor, cfg):
        gate, up = tensor.chunk(2, dim=0)
        return {"gate": gate.contiguous(), "up": up.contiguous()}


_ROW = re.compile(r"^(.*)\[(\d+)\]$")


def row_of(name: str) -> tuple[str, Optional[int]]:
    """'a.b[3]' -> ('a.b', 3): row 3 of a stacked tensor; a plain name -> (name, None)."""
    match = _ROW.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def _fill(pattern: str, numbers: tuple[str, ...]) -> str:
    """Put the canonical name's numbers into an HF pattern: with one number every `*` takes it
    (the layer-only tables), with several each `*` takes the next."""
    if len(numbers) == 1:
        return pattern.replace("*", numbers[0])
    parts = pattern.split("*")
    if len(parts) - 1 > len(numbers):
        raise ValueError(f"HF pattern {pattern} has more wildcards than its canonical pattern")
    return "".join(p + (numbers[i] if i < len(parts) - 1 else "") for i, p in enumerate(parts))


@dataclass
class MappingTable:
    """Looks up the mapping(s) and concrete HF names for a canonical name."""

    mappings: list[Mapping]
    _compiled: list[tuple[re.Pattern, Mapping]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = [(_regex(m.canonical), m) for m in self.mappings]

    def candidates(self, canonical: str) -> list[tuple[Mapping, dict[str, str]]]:
        """Every (mapping, role -> concrete HF name) for a canonical name, the written spelling first."""
        found = []
        for regex, m in self._compiled:
            match = regex.match(canonical)
            if match:
                numbers = match.groups()
                found.append((m, {role: _fill(p, numbers) if numbers else p for role, p in m.hf.items()}))
        return found

    def resolve(self, canonical: str) -> Optional[tuple[Mapping, dict[str, str]]]:
        """(mapping, role -> concrete HF name) of the written spelling, or None when unmapped."""
        found = self.candidates(canonical)
        return found[0] if found else None
