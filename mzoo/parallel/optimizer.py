"""Data-parallel gradient reduction, global gradient clipping and AdamW, optionally distributed.

The trainable parameters of this rank form two flat parameter groups, each viewed as one flat
vector: dense parameters, replicated over the data-parallel (DP) group, and routed-expert
parameters (marked `p.expert_parallel = True`), which differ between expert-parallel (EP) ranks and
are replicated only over the expert-data-parallel (EDP) group. Each group's gradients are reduced
over its own group in buckets (all-reduce), or, with the distributed optimizer, reduce-scattered so
each rank of that group owns a contiguous shard: only that shard keeps fp32 master weights and Adam
states, is updated, and is all-gathered back into the parameters (Megatron's distributed optimizer).
AdamW is element-wise, so every layout performs exactly the same arithmetic on every element.

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

from mzoo.parallel import collectives as C
from mzoo.parallel.sharding import get_spec
from mzoo.parallel.state import Group, ParallelState, check_expert_layout


@dataclass
class AdamWConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    distributed: bool = False  # shard master weights and Adam states over DP (experts: over EDP)
    bucket_elements: int = 40_000_000


def is_expert(p: torch.Tensor) -> bool:
    """Routed-expert weights: split over EP, replicated over EDP."""
    return bool(getattr(p, "expert_parallel", False))


class _FlatGroup:
    """One flat parameter group: its parameters, the group its gradients are reduced over, and this
    rank's shard of the fp32 master weights and Adam states."""

    def __init__(self, params: list[nn.Parameter], group: Group, size: int, rank: int, divisor: int,
                 state: ParallelState, config: AdamWConfig):
        self.params, self.group, self.size, self.rank = params, group, size, rank
        self.divisor, self.config = divisor, config
        self.distributed = config.distributed
        self.numel = sum(p.numel() for p in params)
        self.padded = math.ceil(self.numel / size) * size if self.distributed else self.numel
        device = params[0].device  # buffers live with the parameters (NCCL reduces device tensors)
        flat = torch.zeros(self.padded, dtype=torch.float32, device=device)
        torch.cat([p.detach().float().reshape(-1) for p in params], out=flat[: self.numel])
        # per-element masks: weight decay on matrices only; TP-replicated params counted once in norms
        decay = torch.zeros(self.padded, dtype=torch.bool)
        unique = torch.zeros(self.padded, dtype=torch.bool)
        offset = 0
        for p in params:
            n = p.numel()
            decay[offset : offset + n] = p.dim() >= 2
            copy = getattr(p, "embedding_copy", False)  # counted on the first stage
            unique[offset : offset + n] = (get_spec(p).axis == "tp" or state.tp_rank == 0) and not copy
            offset += n
        shard = self.padded // size if self.distributed else self.padded
        self.lo, self.hi = (rank * shard, (rank + 1) * shard) if self.distributed else (0, self.padded)
        self.master = flat[self.lo : self.hi].clone()
        # precomputed once: the per-element weight decay, and the unique elements as contiguous runs
        self.weight_decay = decay[self.lo : self.hi].float().to(device) * config.weight_decay
        self.unique_runs = _runs(unique[self.lo : self.hi])
        self.flat = torch.zeros(self.padded, dtype=torch.float32, device=device)  # reused gradient buffer
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.scratch = torch.empty_like(self.master)  # the decay factor, then Adam's denominator

    def flat_grads(self) -> torch.Tensor:
        flat, offset = self.flat, 0
        for p in self.params:
            n = p.numel()
            if p.grad is not None:
                flat[offset : offset + n].copy_(p.grad.reshape(-1))
            else:
                flat[offset : offset + n].zero_()
            offset += n
        return flat

    def reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum over the group, then divide by the data-parallel size: this rank's shard
        (distributed) or all of it."""
        if self.group is None:
            grads = flat[self.lo : self.hi]
        elif self.distributed:
            grads = C._reduce_scatter_first(flat, self.group)
        else:
            for start in range(0, flat.numel(), self.config.bucket_elements):
                bucket = flat[start : start + self.config.bucket_elements]
                dist.all_reduce(bucket, group=self.group)
            grads = flat
        return grads.div_(self.divisor) if self.divisor != 1 else grads  # a buffer of this step

    def squared_norm(self, grads: torch.Tensor) -> torch.Tensor:
        """This rank's sum of squares over its unique elements (fp32 dots accumulated in fp64)."""
        sq = torch.zeros((), dtype=torch.float64, device=grads.device)
        for a, b in self.unique_runs:
            seg = grads[a:b]
            sq += torch.dot(seg, seg).double()
        return sq.float()

    def adamw(self, grads: torch.Tensor, lr: float, step: int) -> None:
        cfg = self.config
        b1, b2 = cfg.betas
        self.exp_avg.mul_(b1).add_(grads, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grads, grads, value=1 - b2)
        bias1, bias2 = 1 - b1**step, 1 - b2**step
        # in place, through one persistent buffer: no model-sized temporaries per step, the same
        # arithmetic as `master * (1 - lr * wd)` and `(exp_avg_sq / bias2).sqrt() + eps`
        self.master.mul_(torch.mul(self.weight_decay, -lr, out=self.scratch).add_(1))
        denom = torch.div(self.exp_avg_sq, bias2, out=self.scratch).sqrt_().add_(cfg.eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-lr / bias1)

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The full flat vector (padding included) from every rank's shard."""
        if self.distributed and self.group is not None:
            return C._gather_first(shard.contiguous(), self.group)
        return shard

    def write_back(self) -> None:
        full, offset = self.gather(self.master), 0
        for p in self.params:
            n = p.numel()
            p.data.copy_(full[offset : offset + n].view_as(p))
            offset += n

    def shards(self) -> dict[str, torch.Tensor]:
        return {"fp32_param": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def views(self, full: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(full[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    def load(self, kind: str, tensors: list[torch.Tensor]) -> None:
        flat = torch.zeros(self.padded, dtype=torch.float32, device=self.master.device)
        torch.cat([t.reshape(-1).float().to(flat.device) for t in tensors], out=flat[: self.numel])
        self.shards()[kind].copy_(flat[self.lo : self.hi])


class Optimizer:
    def __init__(self, model: nn.Module, state: ParallelState, config: AdamWConfig):
        self.state, self.config = state, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step_count = 0
        dense = [i for i, p in enumerate(self.params) if not is_expert(p)]
        expert = [i for i, p in enumerate(self.params) if is_expert(p)]
        if expert:
            check_expert_layout(state.config)
        self.dense = self._group(dense, state.dp_group, state.dp, state.dp_rank, state.dp)
        self.expert = self._group(expert, state.edp_group, state.expert_dp, state.edp_rank,
                                  state.dp * state.config.cp)
        # (group, indices into self.params) for the non-empty groups
        self.groups = [(g, idx) for g, idx in ((self.dense, dense), (self.expert, expert)) if g is not None]

    def _group(self, indices: list[int], group: Group, size: int, rank: int, divisor: int) -> Optional[_FlatGroup]:
        if not indices:
            return None
        return _FlatGroup([self.params[i] for i in indices], group, size, rank, divisor, self.state, self.config)

    @property
    def master(self) -> torch.Tensor:
        """The dense group's fp32 master weights (this rank's shard)."""
        group = self.dense or self.expert
        return group.master if group is not None else torch.zeros(0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _sync_replicas(self) -> None:
        """Gradients of parameters held by several ranks of one model replica: tied embeddings on
        the first and last pipeline stages, sequence-parallel norms on every TP rank."""
        if self.state.embedding_group is not None:
            for p in self.params:
                if p.grad is not None and getattr(p, "shared_embedding", False):
                    dist.all_reduce(p.grad, group=self.state.embedding_group)
        if self.state.config.sequence_parallel and self.state.tp_group is not None:
            for p in self.params:
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    dist.all_reduce(p.grad, group=self.state.tp_group)

    def grad_norm(self, grads: Sequence[torch.Tensor]) -> float:
        """Global L2 norm over every parameter of the model, each counted once; `grads` holds one
        reduced gradient (shard) per non-empty parameter group, in `self.groups` order."""
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
            groups = (state.ep_group, state.edp_group) if self.config.distributed else (state.ep_group,)
            for group in groups:
                if group is not None:
                    dist.all_reduce(expert, group=group)
        if self.config.distributed and state.dp_group is not None:
            dist.all_reduce(dense, group=state.dp_group)
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
        grads = [group.reduce(group.flat_grads()) for group, _ in self.groups]
        if loss_scale != 1.0:
            grads = [g.div_(loss_scale) for g in grads]  # buffers of this step: in place
        norm = self.grad_norm(grads)
        if not math.isfinite(norm):
            return norm
        if cfg.clip_grad and norm > cfg.clip_grad:
            grads = [g.mul_(cfg.clip_grad / (norm + 1e-6)) for g in grads]
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

    def param_states(self) -> dict[str, list[torch.Tensor]]:
        """kind -> this rank's full local tensor of every trainable parameter, in model.parameters()
        order (DP / EDP shards gathered)."""
        out: dict[str, list[torch.Tensor]] = {}
        for kind in self.KINDS:
            views: list[Optional[torch.Tensor]] = [None] * len(self.params)
            for group, indices in self.groups:
                for i, view in zip(indices, group.views(group.gather(group.shards()[kind]))):
                    views[i] = view
            out[kind] = views  # type: ignore[assignment]
        return out

    def load_param_states(self, states: dict[str, list[torch.Tensor]], step: int) -> None:
        """Inverse of param_states: full local tensors per parameter -> this rank's shards."""
        for kind in self.KINDS:
            for group, indices in self.groups:
                group.load(kind, [states[kind][i] for i in indices])
        self.step_count = step
        self._write_back()


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D bool mask."""
    if not mask.numel():
        return []
    edges = torch.diff(mask.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8)).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


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
