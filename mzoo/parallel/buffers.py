"""One parameter group's contiguous buffers (mzoo/parallel/optimizer.py has the memory model):
the parameters as views of one buffer in the training dtype, the fp32 main gradients in the same
bucketed layout, this rank's slices of the master weights and Adam states, the buckets'
reductions (all-reduce, or reduce-scatter with the distributed optimizer), their overlap with the
backward and the parameter all-gathers' overlap with the next forward.

Split from optimizer.py, which keeps what spans the groups: the global norm, clipping, the step and
checkpoint states."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from mzoo.parallel.collectives import _all_gather_tensor, _reduce_scatter_tensor
from mzoo.parallel.layers import summed_over_tp
from mzoo.parallel.sharding import get_spec
from mzoo.parallel.state import Group, ParallelState

if TYPE_CHECKING:
    from mzoo.parallel.optimizer import AdamWConfig

CHUNK_ELEMENTS = 1 << 22  # Adam's denominator is computed this many elements at a time (16 MB fp32)


@dataclass
class _Bucket:
    """Buffer elements [lo, hi) (padded to a multiple of the group size when distributed); this rank
    owns [own_lo, own_hi), stored at `state` in the master / moment vectors. Runs are [a, b) in
    own-slice coordinates."""

    lo: int
    hi: int
    own_lo: int
    own_hi: int
    state: int
    decay: list[tuple[int, int]] = field(default_factory=list)  # matrices: weight decay applies
    unique: list[tuple[int, int]] = field(default_factory=list)  # counted once in the global norm
    members: list[int] = field(default_factory=list)  # indices of the parameters it holds
    deferred: bool = False  # holds a tied embedding copy: reduced in `step`, after the copies are summed
    launches: int = 0  # reductions started (tests check: exactly one per step)
    in_backward: int = 0  # of which started inside the backward

    @property
    def own(self) -> int:
        return self.own_hi - self.own_lo


def _intersect(a: int, b: int, lo: int, hi: int) -> Optional[tuple[int, int]]:
    lo, hi = max(a, lo), min(b, hi)
    return (lo, hi) if lo < hi else None


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class _FlatGroup:
    """One parameter group: its parameter and main-gradient buffers, the group its gradients are
    reduced over, and this rank's slices of the fp32 master weights and Adam states."""

    def __init__(self, params: list[nn.Parameter], group: Group, size: int, rank: int, divisor: int,
                 state: ParallelState, config: AdamWConfig):
        self.params, self.group, self.size, self.rank = params, group, size, rank
        self.divisor, self.config = divisor, config
        self.distributed = config.distributed and group is not None and size > 1
        self.offsets, self.buckets = self._layout(params, config.bucket_elements)
        self.padded = self.buckets[-1].hi
        device, dtype = params[0].device, params[0].dtype
        # parameters become views of one contiguous buffer (moved in one at a time)
        self.param_buffer = torch.zeros(self.padded, dtype=dtype, device=device)
        for p, off in zip(params, self.offsets):
            view = self.param_buffer[off : off + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
        self.main_grad = torch.zeros(self.padded, dtype=torch.float32, device=device)
        for p, off in zip(params, self.offsets):
            _bind_grad_hook(p, self.main_grad[off : off + p.numel()].view_as(p))
        for bucket in self.buckets:
            self._runs(bucket, state)
        self.overlap = config.overlap_grad_reduce and group is not None and size > 1
        self.gather_overlap = config.overlap_param_gather and self.distributed
        self.tp_group, self.sp = state.tp_group, state.config.sequence_parallel  # for summed_over_tp grads
        self._bucket_of = [next(k for k, b in enumerate(self.buckets) if b.lo <= off < b.hi) if p.numel() else
                           len(self.buckets) - 1 for p, off in zip(params, self.offsets)]
        for i, k in enumerate(self._bucket_of):
            self.buckets[k].members.append(i)
            if getattr(params[i], "shared_embedding", False) and state.embedding_group is not None:
                self.buckets[k].deferred = True
        self._microbatches = 1
        self._fired = [0] * len(params)  # last-micro-batch gradients seen this step, per parameter
        self._full = [0] * len(self.buckets)  # parameters of the bucket whose gradient is final
        self._next = len(self.buckets) - 1  # the next bucket to start (highest first)
        self._grad_work: dict[int, dist.Work] = {}  # bucket -> its reduction in flight
        self._tp_work: dict[int, dist.Work] = {}  # parameter -> its sequence-parallel sum over TP
        self._gather_work: dict[int, dist.Work] = {}  # bucket -> its parameter all-gather in flight
        if self.overlap:
            for i, p in enumerate(params):
                _bind_grad_hook(p, p.main_grad, after=lambda i=i: self._grad_ready(i))
        n_state = sum(b.own for b in self.buckets)
        self.master = torch.empty(n_state, dtype=torch.float32, device=device)
        self.exp_avg = torch.zeros(n_state, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(n_state, dtype=torch.float32, device=device)
        self.load_master_from_params()

    def _layout(self, params: list[nn.Parameter], bucket_elements: int) -> tuple[list[int], list[_Bucket]]:
        """Parameter offsets and buckets: consecutive parameters up to `bucket_elements` each (a
        parameter never straddles two), padded so that every rank owns an equal slice of each."""
        offsets, buckets, start, off = [], [], 0, 0
        for i, p in enumerate(params):
            offsets.append(off)
            off += p.numel()
            if off - start >= bucket_elements or i == len(params) - 1:
                size = self.size if self.distributed else 1
                hi = start + math.ceil((off - start) / size) * size
                share = (hi - start) // size
                rank = self.rank if self.distributed else 0
                state = sum(b.own for b in buckets)
                buckets.append(_Bucket(start, hi, start + rank * share, start + (rank + 1) * share, state))
                start = off = hi
        return offsets, buckets

    def _runs(self, bucket: _Bucket, state: ParallelState) -> None:
        """Weight decay on matrices only; TP-replicated parameters counted once in norms (on TP
        rank 0), a tied copy of the embedding counted on the first stage."""
        for p, off in zip(self.params, self.offsets):
            cut = _intersect(off, off + p.numel(), bucket.own_lo, bucket.own_hi)
            if cut is None:
                continue
            run = (cut[0] - bucket.own_lo, cut[1] - bucket.own_lo)
            if p.dim() >= 2:
                bucket.decay.append(run)
            copy = getattr(p, "embedding_copy", False)
            if (get_spec(p).axis == "tp" or state.tp_rank == 0) and not copy:
                bucket.unique.append(run)
        bucket.decay, bucket.unique = _merge(bucket.decay), _merge(bucket.unique)

    # ---- views -------------------------------------------------------------------------------
    def own_grads(self) -> list[torch.Tensor]:
        """This rank's slice of every bucket's main gradients (all of them when not distributed)."""
        return [self.main_grad[b.own_lo : b.own_hi] for b in self.buckets]

    def state_slice(self, t: torch.Tensor, b: _Bucket) -> torch.Tensor:
        return t[b.state : b.state + b.own]

    def pieces(self, index: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, state offset): the parts of parameter `index` (flattened [start, end)) that
        this rank owns, and where they sit in the state vectors."""
        off, n = self.offsets[index], self.params[index].numel()
        for b in self.buckets:
            cut = _intersect(off, off + n, b.own_lo, b.own_hi)
            if cut is not None:
                yield cut[0] - off, cut[1] - off, b.state + cut[0] - b.own_lo

    # ---- the step ----------------------------------------------------------------------------
    def zero_grad(self, microbatches: int = 1) -> None:
        if self._grad_work or self._tp_work:
            raise RuntimeError("internal error: gradients zeroed while their reduction is in flight")
        self.main_grad.zero_()
        self._microbatches = microbatches
        self._fired = [0] * len(self.params)
        self._full = [0] * len(self.buckets)
        self._next = len(self.buckets) - 1
        for b in self.buckets:
            b.launches = b.in_backward = 0

    # ---- overlap: reductions started from the backward ---------------------------------------
    def _grad_ready(self, i: int) -> None:
        """Parameter i's gradient of one micro-batch is in main_grad: on the last micro-batch its
        bucket may start."""
        self._fired[i] += 1
        if self._fired[i] < self._microbatches:
            return
        k = self._bucket_of[i]
        if self._fired[i] > self._microbatches or self.buckets[k].launches:
            raise RuntimeError(f"internal error: parameter {i} of a gradient bucket got a gradient after its "
                               "bucket's reduction started (more backward passes than micro-batches?)")
        if self.tp_group is not None and summed_over_tp(self.params[i], self.sp):
            self._tp_work[i] = dist.all_reduce(self.params[i].main_grad, group=self.tp_group, async_op=True)
        self._full[k] += 1
        self._launch_ready(in_backward=True)

    def _launch_ready(self, in_backward: bool) -> None:
        """Start full buckets in descending order; a deferred bucket is skipped (started in `step`)."""
        while self._next >= 0:
            b = self.buckets[self._next]
            if not b.deferred:
                if self._full[self._next] < len(b.members):
                    return
                self._launch(self._next, in_backward)
            self._next -= 1

    def _launch(self, k: int, in_backward: bool) -> None:
        b = self.buckets[k]
        for i in b.members:
            work = self._tp_work.pop(i, None)
            if work is not None:
                work.wait()
        b.launches += 1
        b.in_backward += in_backward
        work = self._start_reduction(b, async_op=True)
        if work is not None:
            self._grad_work[k] = work

    def sync_sequence_parallel(self) -> None:
        """Sum over TP the sequence-parallel (and q/k norm) gradients the backward did not (overlap only)."""
        for i, p in enumerate(self.params):
            if summed_over_tp(p, self.sp) and i not in self._tp_work and \
                    self._fired[i] < self._microbatches:
                dist.all_reduce(p.main_grad, group=self.tp_group)

    def _start_reduction(self, b: _Bucket, async_op: bool) -> Optional[dist.Work]:
        whole = self.main_grad[b.lo : b.hi]
        if self.distributed:
            return _reduce_scatter_tensor(self.main_grad[b.own_lo : b.own_hi], whole, group=self.group,
                                          async_op=async_op)
        if self.group is not None:
            return dist.all_reduce(whole, group=self.group, async_op=async_op)
        return None

    def reduce(self) -> list[torch.Tensor]:
        """Sum each bucket over the group (in place; reduce-scattered into this rank's slice when
        distributed), then divide by the data-parallel size. Returns this rank's slices. With
        overlap, start the buckets the backward did not, in the same order, and wait for all."""
        if self.overlap:
            for k in range(len(self.buckets) - 1, -1, -1):
                if not self.buckets[k].launches:
                    self._launch(k, in_backward=False)
            for work in self._grad_work.values():
                work.wait()
            self._grad_work.clear()
        else:
            for b in self.buckets:
                self._start_reduction(b, async_op=False)
        grads = self.own_grads()
        if self.divisor != 1:
            for g in grads:
                g.div_(self.divisor)
        return grads

    def squared_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """This rank's sum of squares over its unique elements (fp32 dots accumulated in fp64)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.main_grad.device)
        for b, g in zip(self.buckets, grads):
            for lo, hi in b.unique:
                seg = g[lo:hi]
                sq += torch.dot(seg, seg).double()
        return sq.float()

    def adamw(self, grads: list[torch.Tensor], lr: float, step: int) -> None:
        cfg = self.config
        b1, b2 = cfg.betas
        bias1, bias2 = 1 - b1**step, 1 - b2**step
        # the fp32 factor `1 - lr * wd` computed exactly as the per-element vector of earlier versions
        decay = torch.tensor(cfg.weight_decay, dtype=torch.float32, device=self.master.device).mul_(-lr).add_(1)
        scratch = torch.empty(min(CHUNK_ELEMENTS, max(b.own for b in self.buckets)), dtype=torch.float32,
                              device=self.master.device)
        for b, g in zip(self.buckets, grads):
            master = self.state_slice(self.master, b)
            if cfg.weight_decay:
                for lo, hi in b.decay:
                    master[lo:hi].mul_(decay)
            m, v = self.state_slice(self.exp_avg, b), self.state_slice(self.exp_avg_sq, b)
            for lo in range(0, b.own, CHUNK_ELEMENTS):
                hi = min(lo + CHUNK_ELEMENTS, b.own)
                gc, mc, vc = g[lo:hi], m[lo:hi], v[lo:hi]
                mc.mul_(b1).add_(gc, alpha=1 - b1)
                vc.mul_(b2).addcmul_(gc, gc, value=1 - b2)
                denom = torch.div(vc, bias2, out=scratch[: hi - lo]).sqrt_().add_(cfg.eps)
                master[lo:hi].addcdiv_(mc, denom, value=-lr / bias1)

    def write_back(self) -> None:
        """Master slices -> the parameter buffer in the training dtype -> every rank (in place; with
        gather overlap the all-gathers are left in flight for `wait_gather`)."""
        self.finish_param_gather()
        for k, b in enumerate(self.buckets):
            self.param_buffer[b.own_lo : b.own_hi].copy_(self.state_slice(self.master, b))
            if self.distributed:
                work = _all_gather_tensor(self.param_buffer[b.lo : b.hi], self.param_buffer[b.own_lo : b.own_hi],
                                          group=self.group, async_op=self.gather_overlap)
                if self.gather_overlap:
                    self._gather_work[k] = work

    def wait_gather(self, buckets: Sequence[int]) -> None:
        """Wait for the parameter all-gathers of these buckets (no-op once done)."""
        for k in buckets:
            work = self._gather_work.pop(k, None)
            if work is not None:
                work.wait()

    def finish_param_gather(self) -> None:
        self.wait_gather(list(self._gather_work))

    def load_master_from_params(self) -> None:
        for b in self.buckets:
            self.state_slice(self.master, b).copy_(self.param_buffer[b.own_lo : b.own_hi])

    # ---- checkpointing -----------------------------------------------------------------------
    def shards(self) -> dict[str, torch.Tensor]:
        return {"fp32_param": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def full_states(self, kind: str) -> list[torch.Tensor]:
        """Every parameter's whole local tensor of one state kind, on the CPU (gathered bucket by
        bucket over the group when distributed: one bucket-sized device buffer at a time)."""
        values = self.shards()[kind]
        out = [torch.empty(p.shape, dtype=torch.float32, device="cpu") for p in self.params]
        for b in self.buckets:
            own = self.state_slice(values, b)
            if self.distributed:
                whole = torch.empty(b.hi - b.lo, dtype=torch.float32, device=values.device)
                _all_gather_tensor(whole, own.contiguous(), group=self.group)
            else:
                whole = own
            whole = whole.cpu()
            for p, off, target in zip(self.params, self.offsets, out):
                cut = _intersect(off, off + p.numel(), b.lo, b.hi)
                if cut is not None:
                    target.view(-1)[cut[0] - off : cut[1] - off].copy_(whole[cut[0] - b.lo : cut[1] - b.lo])
        return out

    def load(self, kind: str, tensors: list[torch.Tensor]) -> None:
        """Inverse of full_states: this rank's pieces of each parameter's whole local tensor."""
        values = self.shards()[kind]
        for i, t in enumerate(tensors):
            flat = t.reshape(-1)
            for lo, hi, at in self.pieces(i):
                values[at : at + hi - lo].copy_(flat[lo:hi])


def _bind_grad_hook(p: nn.Parameter, main_grad: torch.Tensor, after: Optional[Callable[[], None]] = None) -> None:
    """After autograd accumulates this parameter's gradient of one backward pass, add it into the
    fp32 main gradient and drop it, then call `after` (a later optimizer over the same parameters
    replaces the hook)."""
    old = getattr(p, "_mzoo_grad_hook", None)
    if old is not None:
        old.remove()
    p.main_grad = main_grad

    def accumulate(param: torch.Tensor) -> None:
        main_grad.add_(param.grad)
        param.grad = None
        if after is not None:
            after()

    p._mzoo_grad_hook = p.register_post_accumulate_grad_hook(accumulate)


def _wait_before_forward(model: nn.Module, group: _FlatGroup) -> list[torch.utils.hooks.RemovableHandle]:
    """Pre-forward hooks that wait for the all-gathers of the buckets a module's parameters sit in:
    one per decoder layer (all of its parameters: the unit `--compile` compiles, so a layer's graph
    breaks at most once, at its start) and one per other module holding parameters directly (the
    embedding, the final norm, the output layer). Kept out of torch.compile's graphs (a wait is
    not traceable)."""
    index = {id(p): k for p, k in zip(group.params, group._bucket_of)}
    layers = [name for name, _ in model.named_modules() if _LAYER.search(name)]
    handles = []
    for name, module in model.named_modules():
        if name in layers:
            params = module.parameters()
        elif any(name.startswith(layer + ".") for layer in layers):
            continue  # waited for by its layer
        else:
            params = module.parameters(recurse=False)
        buckets = sorted({index[id(p)] for p in params if id(p) in index})
        if buckets:
            @torch._disable_dynamo  # eager under --compile; the compiler stack is imported on first call
            def wait(_module: nn.Module, _args, buckets: list[int] = buckets) -> None:
                group.wait_gather(buckets)

            handles.append(module.register_forward_pre_hook(wait))
    return handles


_LAYER = re.compile(r"(^|\.)layers\.\d+$")  # a decoder layer's module name
