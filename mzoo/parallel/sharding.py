"""ShardSpec: how one global (canonical) tensor is split across a parallel axis.

Parallel layers attach a ShardSpec to every parameter they create. The engine uses it to size
local shards; checkpoint writers and converters read it off a model built on the `meta` device to
split and merge. This is the only place that knows how a fused tensor splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence

import torch

Axis = Literal["tp", "ep"]


@dataclass(frozen=True)
class ShardSpec:
    """`axis` None means replicated. `sections` are global sizes along `dim` split separately
    (gated fc1: [ffn, ffn]; Mamba in_proj: [z, x, B, C, dt]); rank r holds section_i[r] of each.
    `vocab` marks tensors whose dim is the (padded) vocabulary."""

    axis: Optional[Axis] = None
    dim: int = 0
    sections: Optional[tuple[int, ...]] = None
    vocab: bool = False

    @property
    def replicated(self) -> bool:
        return self.axis is None

    def local_shape(self, shape: Sequence[int], size: int) -> tuple[int, ...]:
        if self.replicated or size == 1:
            return tuple(shape)
        out = list(shape)
        if out[self.dim] % size:
            raise ValueError(f"dimension {self.dim} of size {out[self.dim]} does not split into {size} shards")
        out[self.dim] //= size
        return tuple(out)

    def blocks(self, length: int, rank: int, size: int) -> list[tuple[int, int]]:
        """(start, count) along `dim` of this rank's piece of a global extent `length`: one block,
        or one per section (torch.chunk's split: ceil-sized pieces)."""
        if self.replicated or size == 1:
            return [(0, length)]
        out, start = [], 0
        for n in self.sections or (length,):
            step = -(-n // size)
            out.append((start + rank * step, min(step, n - rank * step)))
            start += n
        return out

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """This rank's piece of the global tensor (a view unless it has several sections)."""
        pieces = [full.narrow(self.dim, start, n) for start, n in self.blocks(full.shape[self.dim], rank, size)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)

    def merge(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The global tensor from all ranks' pieces, in rank order."""
        if self.replicated or len(shards) == 1:
            return shards[0]
        if self.sections is None:
            return torch.cat(list(shards), dim=self.dim)
        size = len(shards)
        local_sections = [s // size for s in self.sections]
        split = [s.split(local_sections, dim=self.dim) for s in shards]
        return torch.cat([split[r][i] for i in range(len(self.sections)) for r in range(size)], dim=self.dim)


REPLICATED = ShardSpec()


def pad_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows up to the padded vocabulary (Megatron-Bridge's convention; trimmed on export)."""
    if tensor.shape[0] >= rows:
        return tensor
    pad = torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=0)


def set_spec(param: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    param.shard_spec = spec  # type: ignore[attr-defined]
    return param


def get_spec(param: torch.Tensor) -> ShardSpec:
    return getattr(param, "shard_spec", REPLICATED)


def shard_padded(value: torch.Tensor, spec: ShardSpec, rank: int, size: int, padded_rows: int) -> torch.Tensor:
    """This rank's shard of a vocabulary tensor padded to `padded_rows`, without materialising the
    padded whole: only the shard that crosses the end of the vocabulary is copied."""
    if not spec.vocab or spec.dim != 0:
        return spec.shard(pad_vocab(value, padded_rows) if spec.vocab else value, rank, size)
    rows = padded_rows // size
    start, stop = rank * rows, (rank + 1) * rows
    real = value[min(start, value.shape[0]) : min(stop, value.shape[0])]
    return real if real.shape[0] == rows else pad_vocab(real, rows)


def to_local(param: torch.Tensor, value: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """This rank's piece of a canonical (global, unpadded) tensor for `param`: sharded by the
    parameter's ShardSpec, the vocabulary padded to the model's padded size."""
    spec = get_spec(param)
    size, rank = (tp, tp_rank) if spec.axis == "tp" else (1, 0)
    piece = shard_padded(value, spec, rank, size, param.shape[spec.dim] * size)
    if piece.shape != param.shape:
        raise ValueError(f"shard shape {tuple(piece.shape)} does not fit parameter {tuple(param.shape)}")
    return piece


def to_global(param: torch.Tensor, local: torch.Tensor, tp_group, tp: int, vocab_size: int) -> torch.Tensor:
    """The canonical tensor from every TP rank's `local` piece (collective over the TP group)."""
    import torch.distributed as dist

    spec = get_spec(param)
    value = local.detach()
    if spec.axis == "tp" and tp_group is not None:
        parts = [torch.empty_like(value) for _ in range(tp)]
        dist.all_gather(parts, value.contiguous(), group=tp_group)
        value = spec.merge(parts)
    return value[:vocab_size] if spec.vocab else value


# ---- experts: EP does not split a tensor, it decides which expert tensors a rank holds ------------
_EXPERT = re.compile(r"^(?P<head>.*\.mlp\.experts\.local_experts\.)(?P<index>\d+)(?P<tail>\..+)$")


def expert_index(name: str) -> Optional[int]:
    """The expert number in a `...mlp.experts.local_experts.{e}...` name, or None."""
    match = _EXPERT.match(name)
    return int(match.group("index")) if match else None


def renumber_expert(name: str, index: int) -> str:
    """The same expert tensor name with expert number `index` (global <-> EP-local)."""
    match = _EXPERT.match(name)
    if match is None:
        raise ValueError(f"{name} is not an expert tensor")
    return f"{match.group('head')}{index}{match.group('tail')}"


def expert_owner(index: int, num_experts: int, ep: int) -> tuple[int, int]:
    """(EP rank, local index) of global expert `index`: experts are numbered ep_rank * E/EP + local."""
    per = num_experts // ep
    return index // per, index % per


@dataclass(frozen=True)
class CanonicalTensor:
    """One canonical tensor: its name, global shape on the true vocabulary, and how it shards."""

    name: str
    shape: tuple[int, ...]
    spec: ShardSpec


# ---- layouts a model cannot take -------------------------------------------------------------------
def _split_what(name: str) -> str:
    """What a TP-split extent of tensor `name` is, in the words of a model's config."""
    if ".mlp.shared_experts." in name:
        return "shared-expert FFN size"
    if ".mlp.experts." in name:
        return "expert FFN size"
    if ".mlp." in name:
        return "FFN size"
    if ".mixer." in name:
        return "Mamba mixer size"
    if ".self_attention." in name:
        return "attention size"
    return "size"


def check_split(tensors: Iterable[CanonicalTensor], tp: int, expert_tp: Optional[int] = None) -> None:
    """Refuse, in one sentence, a TP size that does not divide every extent a ShardSpec splits
    (each section separately; vocabulary rows are padded instead): otherwise writers would emit
    ceil-sized, overlapping shards (108 rows x 3 for 320) that no reader can merge."""
    from mzoo.config import ConfigError

    for t in tensors:
        spec = t.spec
        if spec.axis != "tp" or spec.vocab:
            continue
        size = (expert_tp or tp) if expert_index(t.name) is not None else tp
        if size == 1:
            continue
        for extent in spec.sections or (t.shape[spec.dim],):
            if extent % size:
                flag = "expert tensor parallel size" if size != tp else "tensor parallel size (--tp)"
                raise ConfigError(f"{flag} {size} does not divide the {_split_what(t.name)} {extent} "
                                  f"({t.name} splits along it); choose a size that divides {extent}.")
