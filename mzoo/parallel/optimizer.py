"""Data-parallel gradient reduction, global gradient clipping and AdamW, optionally distributed.

All trainable parameters of this rank are viewed as one flat vector. Gradients are reduced over
the DP group in buckets (all-reduce), or, with the distributed optimizer, reduce-scattered so each
DP rank owns a contiguous shard: only that shard keeps fp32 master weights and Adam states, is
updated, and is all-gathered back into the parameters (Megatron's distributed optimizer). AdamW is
element-wise, so every layout performs exactly the same arithmetic on every element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mzoo.parallel import collectives as C
from mzoo.parallel.sharding import get_spec
from mzoo.parallel.state import ParallelState


@dataclass
class AdamWConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    distributed: bool = False  # shard master weights and Adam states over DP
    bucket_elements: int = 40_000_000


class Optimizer:
    def __init__(self, model: nn.Module, state: ParallelState, config: AdamWConfig):
        self.state, self.config = state, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        dp = state.dp
        self.padded = math.ceil(self.numel / dp) * dp if config.distributed else self.numel
        flat = torch.zeros(self.padded, dtype=torch.float32)
        torch.cat([p.detach().float().reshape(-1) for p in self.params], out=flat[: self.numel])
        # per-element masks: weight decay on matrices only; TP-replicated params counted once in norms
        decay = torch.zeros(self.padded, dtype=torch.bool)
        unique = torch.zeros(self.padded, dtype=torch.bool)
        offset = 0
        for p in self.params:
            n = p.numel()
            decay[offset : offset + n] = p.dim() >= 2
            copy = getattr(p, "embedding_copy", False)  # counted on the first stage
            unique[offset : offset + n] = (get_spec(p).axis == "tp" or state.tp_rank == 0) and not copy
            offset += n
        self.lo, self.hi = self._shard_range()
        self.master = flat[self.lo : self.hi].clone()
        # precomputed once: the per-element weight decay, and the unique elements as contiguous runs
        self.weight_decay = decay[self.lo : self.hi].float() * config.weight_decay
        self.unique_runs = _runs(unique[self.lo : self.hi])
        self.flat = torch.zeros(self.padded, dtype=torch.float32)  # reused gradient buffer
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.step_count = 0

    def _shard_range(self) -> tuple[int, int]:
        if not self.config.distributed:
            return 0, self.padded
        size = self.padded // self.state.dp
        return self.state.dp_rank * size, (self.state.dp_rank + 1) * size

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _flat_grads(self) -> torch.Tensor:
        if self.state.embedding_group is not None:  # tied embeddings across pipeline stages
            for p in self.params:
                if p.grad is not None and getattr(p, "shared_embedding", False):
                    dist.all_reduce(p.grad, group=self.state.embedding_group)
        if self.state.config.sequence_parallel and self.state.tp_group is not None:
            for p in self.params:
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    dist.all_reduce(p.grad, group=self.state.tp_group)
        flat = self.flat
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is not None:
                flat[offset : offset + n].copy_(p.grad.reshape(-1))
            else:
                flat[offset : offset + n].zero_()
            offset += n
        return flat

    def _reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """Average gradients over DP: this rank's shard (distributed) or all of them."""
        group, dp = self.state.dp_group, self.state.dp
        if group is None:
            return flat[self.lo : self.hi]
        if self.config.distributed:
            shard = C._reduce_scatter_first(flat, group)
            return shard / dp
        for start in range(0, flat.numel(), self.config.bucket_elements):
            bucket = flat[start : start + self.config.bucket_elements]
            dist.all_reduce(bucket, group=group)
        return flat / dp

    def grad_norm(self, grads: torch.Tensor) -> float:
        """Global L2 norm over every parameter of the model, each counted once."""
        sq = torch.zeros((), dtype=torch.float64)
        for a, b in self.unique_runs:  # fp32 dot products, accumulated in fp64
            seg = grads[a:b]
            sq += torch.dot(seg, seg).double()
        sq = sq.float()
        for group in (self.state.tp_group, self.state.pp_group):
            if group is not None:
                dist.all_reduce(sq, group=group)
        if self.config.distributed and self.state.dp_group is not None:
            dist.all_reduce(sq, group=self.state.dp_group)
        return math.sqrt(sq.item())

    @torch.no_grad()
    def step(self, lr: float, loss_scale: float = 1.0) -> float:
        """Reduce, unscale, clip, update, write back. Returns the grad norm before clipping, or
        inf (and skips the update) when a gradient overflowed: fp16 loss scaling backs off then."""
        cfg = self.config
        grads = self._reduce(self._flat_grads())
        if loss_scale != 1.0:
            grads = grads / loss_scale
        norm = self.grad_norm(grads)
        if not math.isfinite(norm):
            return norm
        if cfg.clip_grad and norm > cfg.clip_grad:
            grads = grads * (cfg.clip_grad / (norm + 1e-6))
        self.step_count += 1
        b1, b2 = cfg.betas
        self.exp_avg.mul_(b1).add_(grads, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grads, grads, value=1 - b2)
        bias1, bias2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        denom = (self.exp_avg_sq / bias2).sqrt_().add_(cfg.eps)
        self.master.mul_(1 - lr * self.weight_decay)
        self.master.addcdiv_(self.exp_avg, denom, value=-lr / bias1)
        self._write_back()
        return norm

    def _write_back(self) -> None:
        if self.config.distributed and self.state.dp_group is not None:
            full = C._gather_first(self.master, self.state.dp_group)
        else:
            full = self.master
        offset = 0
        for p in self.params:
            n = p.numel()
            p.data.copy_(full[offset : offset + n].view_as(p))
            offset += n

    # ---- checkpointing: per-parameter states, so they reshard like weights ------------------
    KINDS = ("fp32_param", "exp_avg", "exp_avg_sq")

    def _shards(self) -> dict[str, torch.Tensor]:
        return {"fp32_param": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def param_states(self) -> dict[str, list[torch.Tensor]]:
        """kind -> this rank's full local tensor of every parameter (DP shards gathered)."""
        out = {}
        for kind, shard in self._shards().items():
            full = shard
            if self.config.distributed and self.state.dp_group is not None:
                full = C._gather_first(shard.contiguous(), self.state.dp_group)
            views, offset = [], 0
            for p in self.params:
                views.append(full[offset : offset + p.numel()].view(p.shape))
                offset += p.numel()
            out[kind] = views
        return out

    def load_param_states(self, states: dict[str, list[torch.Tensor]], step: int) -> None:
        """Inverse of param_states: full local tensors per parameter -> this rank's shards."""
        for kind, shard in self._shards().items():
            flat = torch.zeros(self.padded, dtype=torch.float32)
            torch.cat([t.reshape(-1).float() for t in states[kind]], out=flat[: self.numel])
            shard.copy_(flat[self.lo : self.hi])
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
