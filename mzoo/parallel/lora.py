"""Low-rank adapters (LoRA) on the engine's column- and row-parallel linears, tensor-parallel aware.

y = W x + scaling * B A x with A [r, in] and B [out, r]; the base W stays frozen in its training
dtype and only A and B are trainable, so the optimizer (fp32 master weights, Adam moments, main
gradients) holds nothing of the base.

One adapter per Hugging Face projection (Megatron-Bridge's CanonicalLoRA), not one on the fused
tensor: a fused linear_qkv carries separate (A, B) pairs for q, k and v, a gated linear_fc1 for gate
and up. Both directions are then exact: an mzoo adapter is a peft adapter tensor for tensor, and a
peft adapter with distinct A's per projection (what peft itself makes) loads without growing the
rank, which a single fused A cannot hold. The model (models/lora.py) says how the parts' outputs
interleave into the fused output (q/k/v grouped per query group, fc1 as [gate; up]).

Tensor parallelism as Megatron-Bridge: on a column-parallel base A is replicated and B split by
rows like the base; on a row-parallel base A is split by columns like the base and B replicated.
The collectives are the base's own, applied to the rank-r activation A x instead of to x:

- column: A x is computed on this rank's input (a sequence shard under sequence parallelism), then
  copied to / gathered over TP; its backward sums every rank's partial gradient, so A's gradient is
  complete (under SP each rank's covers its sequence shard: A is marked `sequence_parallel` and its
  gradient summed over TP, as for the norms);
- row: A_r x_r is a partial sum, reduced (reduce-scattered under SP) like the base's output; B then
  acts on the reduced activation (B marked `sequence_parallel`, as the row-parallel bias).

Every adapter tensor carries a ShardSpec, so the checkpoint and converter code shard and merge it
like any other tensor; its canonical name is the base's prefix plus `lora.{part}.linear_in.weight`
(A) or `lora.{part}.linear_out.weight` (B), the part being the projection (q, k, v, gate, up; proj,
fc1 or fc2 for an unfused one). The base linear calls its `lora` module (mzoo/parallel/layers.py)
rather than being wrapped, so the base's own names stay canonical and base checkpoints load as they are.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mzoo.errors import UserError
from mzoo.parallel import collectives as C
from mzoo.parallel.sharding import REPLICATED, ShardSpec, get_spec, set_spec
from mzoo.parallel.state import ParallelState

TARGETS = ("qkv", "proj", "fc1", "fc2")  # what --lora-targets names (Megatron's module names)
# each target's parts, by the family tables' roles (a model has the ones that exist in it)
PARTS = {"qkv": ("q", "k", "v"), "proj": ("proj",), "fc1": ("gate", "up", "fc1"), "fc2": ("fc2",)}


@dataclass(frozen=True)
class LoRAConfig:
    """`parts`: the projections that get an adapter (q, k, v, proj, gate, up, fc1, fc2), so an
    adapter made elsewhere on some of them (peft's default for llama: q and v) loads as it is."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    parts: tuple[str, ...] = PARTS["qkv"] + PARTS["proj"] + PARTS["fc1"] + PARTS["fc2"]
    rslora: bool = False  # scaling alpha / sqrt(r) (peft's use_rslora) instead of alpha / r

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> None:
        if self.rank < 1:
            raise UserError(f"--lora-rank {self.rank} must be at least 1.")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--lora-dropout {self.dropout:g} must be in [0, 1).")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise UserError(f"--lora-alpha {self.alpha:g} must be a positive number.")
        unknown = sorted(set(self.parts) - {p for ps in PARTS.values() for p in ps})
        if unknown or not self.parts:
            raise UserError(f"unknown LoRA target {', '.join(unknown) or '(none)'}; use some of {','.join(TARGETS)}.")


def parse_targets(text: str) -> tuple[str, ...]:
    """'qkv,proj,fc1,fc2' -> the parts they hold; 'experts' is refused in one sentence."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if "experts" in names:
        raise UserError("LoRA on routed experts is not supported yet; drop 'experts' from --lora-targets.")
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise UserError(f"unknown --lora-targets '{text}'; use a comma-separated list of {','.join(TARGETS)}.")
    return tuple(p for t in TARGETS if t in names for p in PARTS[t])


class _Weight(nn.Module):
    """Holds one adapter matrix as `weight` (the canonical names end in linear_in/out.weight)."""

    def __init__(self, shape: tuple[int, int], spec: ShardSpec, dtype: Optional[torch.dtype], sequence_parallel: bool):
        super().__init__()
        self.weight = set_spec(nn.Parameter(torch.empty(*shape, dtype=dtype)), spec)
        self.weight.lora = True  # type: ignore[attr-defined]  # not in base checkpoints
        if sequence_parallel:
            self.weight.sequence_parallel = True  # type: ignore[attr-defined]


class LowRank(nn.Module):
    """One (A, B) pair: `linear_in` A [r, in], `linear_out` B [out, r] (local shapes)."""

    def __init__(self, in_local: int, out_local: int, rank: int, a_spec: ShardSpec, b_spec: ShardSpec, dtype):
        super().__init__()
        self.linear_in = _Weight((rank, in_local), a_spec, dtype, a_spec.replicated)
        self.linear_out = _Weight((out_local, rank), b_spec, dtype, b_spec.replicated)


Combine = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


class ColumnLoRA(nn.Module):
    """The adapters of a column-parallel linear: parts -> local outputs -> `combine` into the base's
    (fused, local) output layout; `combine(outputs, like)` fills parts that have no adapter with zeros."""

    def __init__(self, in_features: int, parts: dict[str, int], cfg: LoRAConfig, state: ParallelState,
                 combine: Combine, dtype=None):
        super().__init__()
        tp = state.tp
        for role, rows in parts.items():
            self.add_module(role, LowRank(in_features, rows // tp, cfg.rank, REPLICATED, ShardSpec("tp", 0), dtype))
        self.state, self.scaling, self.dropout, self.combine = state, cfg.scaling, cfg.dropout, combine

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sp, group = self.state.config.sequence_parallel, self.state.tp_group
        outs = {}
        for role, pair in self.named_children():
            h = F.linear(_dropout(x, self.dropout, self.training, self.state, split=sp), pair.linear_in.weight)
            h = C.gather_from_sp(h, group) if sp else C.copy_to_tp(h, group)
            outs[role] = F.linear(h, pair.linear_out.weight) * self.scaling
        return self.combine(outs, like)


class RowLoRA(nn.Module):
    """The adapter of a row-parallel linear (one part): A split by columns, B replicated."""

    def __init__(self, in_features: int, out_features: int, role: str, cfg: LoRAConfig, state: ParallelState,
                 dtype=None):
        super().__init__()
        self.add_module(role, LowRank(in_features // state.tp, out_features, cfg.rank, ShardSpec("tp", 1),
                                      REPLICATED, dtype))
        self.state, self.scaling, self.dropout = state, cfg.scaling, cfg.dropout

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        (pair,) = self.children()
        sp, group = self.state.config.sequence_parallel, self.state.tp_group
        h = F.linear(_dropout(x, self.dropout, self.training, self.state, split=self.state.tp > 1), pair.linear_in.weight)
        h = C.reduce_scatter_to_sp(h, group) if sp else C.reduce_from_tp(h, group)
        return F.linear(h, pair.linear_out.weight) * self.scaling


def _dropout(x: torch.Tensor, p: float, training: bool, state: ParallelState, split: bool) -> torch.Tensor:
    """peft's dropout on the adapter's input: one mask on every TP rank for a replicated input, each
    rank's own (model-parallel stream) for a split one."""
    if not p or not training:
        return x
    if not split:
        return F.dropout(x, p, True)
    with state.rng.fork():
        return F.dropout(x, p, True)


def freeze(model: nn.Module) -> None:
    """The base: no gradients, so neither main gradients nor optimizer state are made for it."""
    for p in model.parameters():
        p.requires_grad_(False)


def is_adapter(p: torch.Tensor) -> bool:
    return bool(getattr(p, "lora", False))


def init_adapter_tensor(name: str, shape: tuple[int, ...], seed: int, b_std: float = 0.0) -> torch.Tensor:
    """peft's init on the global tensor: A kaiming-uniform (a = sqrt(5): bound 1 / sqrt(in)), B zeros
    (the finetune starts at the base model), or normal(0, b_std) for tests that need B to matter.
    Seeded by name, so every layout starts from the same adapter."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("linear_in.weight"):
        bound = 1.0 / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    if not b_std:
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, b_std, generator=gen)


def global_shape(p: torch.Tensor, tp: int) -> tuple[int, ...]:
    spec, shape = get_spec(p), list(p.shape)
    if spec.axis == "tp":
        shape[spec.dim] *= tp
    return tuple(shape)
