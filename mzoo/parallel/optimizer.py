"""Data-parallel gradient reduction, global gradient clipping and AdamW, optionally distributed, with
Megatron's mixed-precision memory model.

The trainable parameters of this rank form two parameter groups: dense parameters, replicated over
the data-parallel x context-parallel (DP x CP) group (plain DP when cp = 1), and routed-expert parameters (marked `p.expert_parallel = True`), which
differ between expert-parallel (EP) ranks and are replicated only over the expert-data-parallel (EDP)
group. Each group owns two persistent, contiguous buffers in the same layout, split into buckets:

- the parameters themselves (training dtype: bf16 / fp16 / fp32): every parameter is a view of it;
- the fp32 main gradients: a hook after autograd accumulates each parameter's gradient adds it into
  its view (`p.main_grad`) and drops `p.grad`, so gradients accumulate across micro-batches in fp32
  and no low-precision `.grad` is kept alongside (Megatron's main_grad).

Each bucket is all-reduced over the group, or, with the distributed optimizer, reduce-scattered in
place so each rank owns one contiguous slice of every bucket: only those slices keep fp32 master
weights and Adam's moments (12 bytes per element), are updated, written back into the parameter
buffer in the training dtype, and all-gathered in place (Megatron's distributed optimizer). Per
parameter that is 2 + 4 + 12 / dp bytes for bf16. Weight decay is a scalar per run of matrix
elements, not a vector; Adam's denominator goes through a bounded chunk buffer. AdamW is
element-wise, so every layout performs exactly the same arithmetic on every element.

Overlap (Megatron's overlap_grad_reduce / overlap_param_gather). With `overlap_grad_reduce`, a
bucket's reduction starts asynchronously inside the backward of the step's last micro-batch, as
soon as every parameter in it has received its last gradient, and `step` only waits for it. Buckets
start in one fixed order (highest first, the order the backward fills them), so every rank of a
group issues the same collectives in the same order even when one rank's bucket fills late (an
expert that got no tokens): a bucket that is not full when its turn comes holds back the lower ones
until `step`. A bucket holding a tied embedding is reduced in `step`, after the embedding's copies
on the first and last stages are summed (their stages finish the backward at different times);
sequence-parallel norms are summed over TP inside the backward before their bucket starts. Every
gradient therefore goes through the same sums in the same order as without overlap, and the two
runs are bitwise equal. With `overlap_param_gather` (distributed optimizer), the all-gather of the
updated parameters is started per bucket at the end of `step` and waited for by a pre-forward hook
of the first module that uses them, so it overlaps the next forward; anything else that reads the
parameters calls `finish_param_gather` first.

The buffers, buckets, reductions and overlap of one group live in mzoo/parallel/buffers.py; this
module keeps what spans the groups (global norm, clipping, the step, checkpoint states).

Expert gradients are summed over EDP and divided by dp * cp: the all-to-all backward already brought
every EP rank's tokens into each expert's gradient, so this is the mean over all data-parallel ranks,
as for the dense parameters (Megatron-Core does the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from mzoo.parallel.buffers import _FlatGroup, _wait_before_forward
from mzoo.parallel.layers import summed_over_tp
from mzoo.parallel.state import Group, ParallelState, check_expert_layout


@dataclass
class AdamWConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    distributed: bool = False  # shard master weights and Adam states over DP x CP (experts: over EDP)
    bucket_elements: int = 40_000_000
    overlap_grad_reduce: bool = False  # start each bucket's reduction inside the backward
    overlap_param_gather: bool = False  # with `distributed`: the all-gather overlaps the next forward


def is_expert(p: torch.Tensor) -> bool:
    """Routed-expert weights: split over EP, replicated over EDP."""
    return bool(getattr(p, "expert_parallel", False))


class Optimizer:
    def __init__(self, model: nn.Module, state: ParallelState, config: AdamWConfig):
        self.state, self.config = state, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step_count = 0
        dense = [i for i, p in enumerate(self.params) if not is_expert(p)]
        expert = [i for i, p in enumerate(self.params) if is_expert(p)]
        if expert:
            check_expert_layout(state.config)
        # dense parameters are replicated over dp x cp (context-parallel ranks see different tokens)
        self.dense = self._group(dense, state.dp_cp_group, state.dp_cp, state.dp_cp_rank, state.dp_cp)
        self.expert = self._group(expert, state.edp_group, state.expert_dp, state.edp_rank,
                                  state.dp * state.config.cp)
        # (group, indices into self.params) for the non-empty groups
        self.groups = [(g, idx) for g, idx in ((self.dense, dense), (self.expert, expert)) if g is not None]
        self._gather_hooks = [_wait_before_forward(model, group) for group, _ in self.groups if group.gather_overlap]

    def _group(self, indices: list[int], group: Group, size: int, rank: int, divisor: int) -> Optional[_FlatGroup]:
        if not indices:
            return None
        return _FlatGroup([self.params[i] for i in indices], group, size, rank, divisor, self.state, self.config)

    @property
    def master(self) -> torch.Tensor:
        """The dense group's fp32 master weights (this rank's slices)."""
        group = self.dense or self.expert
        return group.master if group is not None else torch.zeros(0)

    def zero_grad(self, microbatches: int = 1) -> None:
        """Before a step of `microbatches` backward passes (overlap starts buckets on the last)."""
        for p in self.params:
            p.grad = None
        for group, _ in self.groups:
            group.zero_grad(microbatches)

    def finish_param_gather(self) -> None:
        """Wait for every parameter all-gather still in flight (before reading the parameters
        outside a forward: saving, exporting)."""
        for group, _ in self.groups:
            group.finish_param_gather()

    def _sync_replicas(self) -> None:
        """Gradients of parameters held by several ranks of one model replica: tied embeddings on
        the first and last pipeline stages, sequence-parallel norms on every TP rank (with overlap,
        the backward already summed those whose gradient was final)."""
        if self.state.embedding_group is not None:
            for p in self.params:
                if getattr(p, "shared_embedding", False):
                    dist.all_reduce(p.main_grad, group=self.state.embedding_group)
        if self.state.tp_group is not None:
            sp = self.state.config.sequence_parallel
            for group, _ in self.groups:
                if group.overlap:
                    group.sync_sequence_parallel()
                    continue
                for p in group.params:
                    if summed_over_tp(p, sp):
                        dist.all_reduce(p.main_grad, group=self.state.tp_group)

    def grad_norm(self, grads: Sequence[list[torch.Tensor]]) -> float:
        """Global L2 norm over every parameter of the model, each counted once; `grads` holds the
        reduced gradient slices of each non-empty parameter group, in `self.groups` order."""
        state = self.state
        device = self.params[0].device if self.params else None
        dense = torch.zeros((), dtype=torch.float32, device=device)
        expert = torch.zeros((), dtype=torch.float32, device=device)
        for (group, _), g in zip(self.groups, grads):
            if group is self.expert:
                expert = group.squared_norm(g)
            else:
                dense = group.squared_norm(g)
        if self.expert is not None:  # every rank of an EP / EDP group is on the same stage: same params
            groups = (state.ep_group, state.edp_group) if self.expert.distributed else (state.ep_group,)
            for group in groups:
                if group is not None:
                    dist.all_reduce(expert, group=group)
        if self.dense is not None and self.dense.distributed:
            dist.all_reduce(dense, group=state.dp_cp_group)
        sq = torch.stack([dense, expert])
        for group in (state.tp_group, state.pp_group):
            if group is not None:
                dist.all_reduce(sq, group=group)
        return math.sqrt(sq.sum().item())

    @torch.no_grad()
    def step(self, lr: float, loss_scale: float = 1.0) -> float:
        """Reduce, unscale, clip, update, write back. Returns the grad norm before clipping, or
        inf (and skips the update) when a gradient overflowed: fp16 loss scaling backs off then."""
        cfg = self.config
        self._sync_replicas()
        grads = [group.reduce() for group, _ in self.groups]
        if loss_scale != 1.0:
            for g in (t for gs in grads for t in gs):
                g.div_(loss_scale)
        norm = self.grad_norm(grads)
        if not math.isfinite(norm):
            return norm
        if cfg.clip_grad and norm > cfg.clip_grad:
            for g in (t for gs in grads for t in gs):
                g.mul_(cfg.clip_grad / (norm + 1e-6))
        self.step_count += 1
        for (group, _), g in zip(self.groups, grads):
            group.adamw(g, lr, self.step_count)
        self._write_back()
        return norm

    def _write_back(self) -> None:
        for group, _ in self.groups:
            group.write_back()

    # ---- checkpointing: per-parameter states, so they reshard like weights ------------------
    KINDS = ("fp32_param", "exp_avg", "exp_avg_sq")

    def param_states(self, kinds: Sequence[str] = KINDS) -> dict[str, list[torch.Tensor]]:
        """kind -> this rank's full local tensor of every trainable parameter, in model.parameters()
        order, on the CPU (DP / EDP shards gathered)."""
        self.finish_param_gather()
        out: dict[str, list[torch.Tensor]] = {}
        for kind in kinds:
            views: list[Optional[torch.Tensor]] = [None] * len(self.params)
            for group, indices in self.groups:
                for i, value in zip(indices, group.full_states(kind)):
                    views[i] = value
            out[kind] = views  # type: ignore[assignment]
        return out

    def load_param_states(self, states: dict[str, list[torch.Tensor]], step: int) -> None:
        """Inverse of param_states: full local tensors per parameter -> this rank's shards."""
        for kind in self.KINDS:
            for group, indices in self.groups:
                group.load(kind, [states[kind][i] for i in indices])
        self.step_count = step
        self._write_back()


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate for a 1-based step: linear warm-up, then cosine / WSD / constant decay."""
    if warmup and step <= warmup:
        return lr * step / warmup
    if schedule == "constant" or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":  # warmup-stable-decay: hold, then linear decay over the last 20%
        return lr if progress < 0.8 else min_lr + (lr - min_lr) * (1 - progress) / 0.2
    raise ValueError(f"unknown schedule '{schedule}'")
