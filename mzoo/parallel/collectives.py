"""Megatron's tensor-parallel autograd collectives, and the expert-parallel all-to-all.

Each function is the identity when the group is None (one rank), so model code calls them
unconditionally and runs unchanged in one process, under gloo on CPUs and NCCL on GPUs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]
# torch >= 2.13 renamed the single-tensor collectives; same arguments.
_all_gather_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    out = torch.empty((x.shape[0] * n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=0)[dist.get_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    """Forward identity, backward all-reduce: the input of a column-parallel linear."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce, backward identity: the output of a row-parallel linear."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """Forward all-gather on the last dim, backward split."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    """Sequence parallel: all-gather along the sequence (first) dim; backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_first(g, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    """Sequence parallel: reduce-scatter along the sequence dim; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_first(g, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """Sequence parallel: keep this rank's sequence chunk; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_first(g, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _GatherFromTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _ReduceScatterToSP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group is None else _ScatterToSP.apply(x, group)


# ---- expert parallelism: token exchange between the ranks of an EP group ---------------------------
def _all_to_all_rows(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                     group: Group) -> torch.Tensor:
    """Rows x[sum(input_split_sizes[:j]):...] go to rank j; rank j's rows for us arrive in rank order."""
    if x.shape[0] != sum(input_split_sizes):
        raise ValueError(f"input has {x.shape[0]} rows but the input splits sum to {sum(input_split_sizes)}")
    out = torch.empty((sum(output_split_sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    # single-tensor form: gloo supports uneven (and zero) splits only here, not in the list form
    dist.all_to_all_single(out, x.contiguous(), list(output_split_sizes), list(input_split_sizes), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """All-to-all along dim 0; backward sends the gradient rows back with the splits swapped."""

    @staticmethod
    def forward(ctx, x, output_split_sizes, input_split_sizes, group):
        ctx.splits, ctx.group = (output_split_sizes, input_split_sizes), group
        return _all_to_all_rows(x, output_split_sizes, input_split_sizes, group)

    @staticmethod
    def backward(ctx, g):
        output_split_sizes, input_split_sizes = ctx.splits
        return _all_to_all_rows(g, input_split_sizes, output_split_sizes, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
               group: Group) -> torch.Tensor:
    """Differentiable all-to-all of rows (dim 0) with uneven splits: input_split_sizes[j] rows go to
    rank j of `group`, output_split_sizes[j] rows come from it. The identity when group is None."""
    if group is None:
        return x
    return _AllToAll.apply(x, list(output_split_sizes), list(input_split_sizes), group)


def exchange_counts(send_counts: torch.Tensor, group: Group) -> torch.Tensor:
    """Exchange counts before an all-to-all: `send_counts` holds world * k entries (e.g. k tokens
    per local expert), block j goes to rank j of `group`; block j of the result is what rank j sent
    us. int64, not differentiable; the identity when group is None."""
    if group is None:
        return send_counts
    counts = send_counts.to(torch.int64).contiguous()
    if counts.numel() % dist.get_world_size(group):
        raise ValueError(f"{counts.numel()} counts do not split evenly over {dist.get_world_size(group)} ranks")
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out
