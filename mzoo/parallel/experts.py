"""Expert-parallel plumbing for mixture-of-experts layers: token dispatch and combine over TP and
EP, the load-balancing loss and its backward hook, and the aux-loss-free bias update.

The model (models/moe.py) owns the router and the expert weights; this module moves tokens to
the ranks that hold their experts and back, with Megatron-Core's semantics:

- TP: every TP rank runs its shard of each expert on all of the TP group's tokens (gathered
  along the sequence under SP); partial outputs are summed (reduce-scattered under SP).
- EP: token copies sorted by expert go to the expert's rank through `all_to_all_single` with
  uneven splits; experts are numbered `ep_rank * E/EP + local`.
- Dispatch is one stable sort and one gather; the combine is one gather back and a weighted sum
  over top-k, so no step (forward or backward) adds rows by index (GPU atomics); the split sizes
  cost one device-to-host copy per layer.
- Experts run as `torch._grouped_mm` where `grouped_gemm_supported` says the device and dtype
  allow it, on weights stacked without a copy when they sit in one buffer (the optimizer's).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mzoo.parallel import collectives as C
from mzoo.parallel.state import ParallelState

RunExperts = Callable[[torch.Tensor, list[int], torch.Tensor], torch.Tensor]
"""(rows sorted by local expert, rows per local expert on the host, the same counts on the rows' device)."""


def routed_experts(tokens: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, num_experts: int,
                   state: ParallelState, run: RunExperts) -> torch.Tensor:
    """tokens [T, H] (this rank's sequence shard under SP), routing weights and expert indices
    [T, k] -> the weighted sum of each token's experts [T, H], on the same tokens."""
    tp_group, sp = state.tp_group, state.config.sequence_parallel
    if sp:
        tokens, weights = C.gather_from_sp(tokens, tp_group), C.gather_from_sp(weights, tp_group)
        indices = _all_gather_rows(indices, tp_group)
    else:  # replicated tokens; grads of tokens and weights are partial per TP shard: sum them
        tokens, weights = C.copy_to_tp(tokens, tp_group), C.copy_to_tp(weights, tp_group)
    out = _dispatch_and_combine(tokens, weights, indices, num_experts, state, run)
    return C.reduce_scatter_to_sp(out, tp_group) if sp else C.reduce_from_tp(out, tp_group)


def _dispatch_and_combine(tokens: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, num_experts: int,
                          state: ParallelState, run: RunExperts) -> torch.Tensor:
    """One stable sort of the (token, k) copies by expert, one gather into that order, the EP
    exchange, the experts, the exchange back, one gather back to (token, k) order and a weighted
    sum over k. No scatter-add anywhere (forward or backward), so the result and its gradients do
    not depend on the order GPU threads finish in; one device-to-host copy of counts per call."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # sorted position -> (token, k) copy
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    counts = torch.bincount(flat, minlength=num_experts)
    routed = _Dispatch.apply(tokens, order, inverse, k)
    ep, group = state.config.ep, state.ep_group
    if ep > 1 and group is not None:
        out = _exchange_and_run(routed, counts, ep, group, run)
    else:
        out = run(routed, counts.tolist(), counts)
    per_copy = _Combine.apply(out, order, inverse, k)  # [T, k, H]
    return (per_copy * weights.unsqueeze(-1).to(per_copy.dtype)).sum(1)


def _exchange_and_run(routed: torch.Tensor, counts: torch.Tensor, ep: int, group, run: RunExperts) -> torch.Tensor:
    """Rows sorted by global expert -> the ranks holding those experts (all-to-all), regrouped there
    from (source rank, local expert) to (local expert, source rank) order, run, and sent back."""
    local = counts.numel() // ep
    received = C.exchange_counts(counts, group)  # [source rank, local expert], on the device
    both = torch.cat([counts, received]).tolist()  # the one device-to-host sync of this layer
    sent, got = both[: counts.numel()], both[counts.numel():]
    send = [sum(sent[r * local:(r + 1) * local]) for r in range(ep)]
    recv = [sum(got[r * local:(r + 1) * local]) for r in range(ep)]
    per_expert = [sum(got[r * local + e] for r in range(ep)) for e in range(local)]
    arrived = C.all_to_all(routed, recv, send, group)
    by_rank = [r * local + e for e in range(local) for r in range(ep)]  # expert-major order of the blocks
    out = run(_reorder_blocks(arrived, got, by_rank), per_expert, received.view(ep, local).sum(0))
    back = [e * ep + r for r in range(ep) for e in range(local)]  # and rank-major again
    return C.all_to_all(_reorder_blocks(out, [got[i] for i in by_rank], back), send, recv, group)


def _reorder_blocks(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """Row blocks of `sizes` put in `order` (Megatron's sort_chunks_by_idxs): one copy, whose
    backward is a split of the gradient, not a scatter."""
    if order == sorted(order):
        return x
    blocks = x.split(sizes)
    return torch.cat([blocks[i] for i in order])


class _Dispatch(torch.autograd.Function):
    """tokens [T, H] -> their k copies in expert order [T*k, H] (one gather). Backward gathers each
    copy's gradient back to (token, k) order and sums over k: autograd's own backward of a gather
    is an index_add, atomic adds on GPUs."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return tokens.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """Expert outputs in expert order [T*k, H] -> [T, k, H] in (token, k) order, by the inverse
    permutation (one gather); backward is the forward permutation, another gather."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        return rows.index_select(0, inverse).view(-1, k, rows.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.reshape(-1, grad.shape[-1]).index_select(0, order), None, None, None


# ---- grouped GEMM: all local experts in one kernel ---------------------------------------------------
GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # run and match the loop on torch 2.13
GROUPED_MM_CUDA_MAJORS = (9, 10)  # the CUTLASS bf16 kernel (sm90, sm100); other GPUs loop inside torch
CUDA_ROW_MULTIPLE = 8  # rows per group on CUDA: 16 bytes of bf16, torchtitan's TOKEN_GROUP_ALIGN_SIZE_M


def grouped_gemm_allowed(device_type: str, dtype: torch.dtype, capability: Optional[tuple[int, int]],
                         widths: Sequence[int]) -> bool:
    """Whether `torch._grouped_mm` may run the experts. On CUDA only its bf16 CUTLASS kernel
    (sm90 / sm100): elsewhere torch falls back to a loop of matmuls after copying the offsets to
    the host, the per-expert loop without its sync. On the CPU fp32 / bf16 / fp16 (tested against
    the loop). And every matrix row (`widths`: hidden and this rank's FFN size) a multiple of 16
    bytes, which the kernel requires of its strides (wrong results on CUDA otherwise)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device_type == "cuda":
        ok = dtype == torch.bfloat16 and capability is not None and capability[0] in GROUPED_MM_CUDA_MAJORS
    else:
        ok = device_type == "cpu" and dtype in GROUPED_MM_CPU_DTYPES
    return ok and all(w * dtype.itemsize % 16 == 0 for w in widths)


def grouped_gemm_supported(device: torch.device, dtype: torch.dtype, widths: Sequence[int]) -> bool:
    """`grouped_gemm_allowed` for a real device."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return grouped_gemm_allowed(device.type, dtype, capability, widths)


def grouped_row_multiple(device: torch.device) -> int:
    """Rows each group is padded to: on CUDA a multiple of 8, at least 8, as torchtitan pads for
    this kernel (no empty group, every group 16-byte aligned along the token dimension of the
    weight-gradient GEMM); the CPU kernel needs none."""
    return CUDA_ROW_MULTIPLE if device.type == "cuda" else 1


def grouped_mlp(x: torch.Tensor, sizes: list[int], counts: torch.Tensor, fc1: Sequence[torch.Tensor],
                fc2: Sequence[torch.Tensor], activation: Callable[[torch.Tensor], torch.Tensor],
                row_multiple: int = 1, fc1_bias: Optional[Sequence[torch.Tensor]] = None,
                fc2_bias: Optional[Sequence[torch.Tensor]] = None, add_fc2_bias: bool = True) -> torch.Tensor:
    """Expert MLPs on rows sorted by expert (`sizes` rows each; `counts` the same on x's device):
    fc2_e(activation(fc1_e(x))) for every expert e in two `torch._grouped_mm` calls. Groups are
    padded with zero rows to `row_multiple` (dropped again after), offsets computed on the device.
    Expert biases (GPT-OSS) are added per group; fc2's only where `add_fc2_bias` (TP rank 0: see
    models/moe.py), its gradient taken on every rank."""
    padded = sizes if row_multiple == 1 else [max(row_multiple, -(-n // row_multiple) * row_multiple) for n in sizes]
    if row_multiple > 1:
        counts = ((counts + row_multiple - 1) // row_multiple * row_multiple).clamp_min(row_multiple)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    group = None
    if fc1_bias is not None or fc2_bias is not None:  # each row's expert, on the device (no host sync)
        group = torch.repeat_interleave(torch.arange(len(padded), device=x.device), counts, output_size=sum(padded))
    h = grouped_linear(_resize_blocks(x, sizes, padded), stack_weights(fc1), offsets)
    if fc1_bias is not None:
        h = _GroupBias.apply(h, stack_weights(fc1_bias), group, counts, True)
    out = grouped_linear(activation(h), stack_weights(fc2), offsets)
    if fc2_bias is not None:
        out = _GroupBias.apply(out, stack_weights(fc2_bias), group, counts, add_fc2_bias)
    return _resize_blocks(out, padded, sizes)


class _GroupBias(torch.autograd.Function):
    """rows [N, w] + bias[group of the row] ([G, w] stacked biases), or the rows unchanged where `add`
    is false. Backward: the bias gradient is each group's row sum (a segment reduction, no
    scatter-add), taken whether or not this rank added the bias."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, bias: torch.Tensor, group: torch.Tensor, counts: torch.Tensor,
                add: bool) -> torch.Tensor:
        ctx.save_for_backward(counts)
        return rows + bias.index_select(0, group).to(rows.dtype) if add else rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (counts,) = ctx.saved_tensors
        return grad, torch.segment_reduce(grad, "sum", lengths=counts, axis=0), None, None, None


def _resize_blocks(x: torch.Tensor, sizes: list[int], new: list[int]) -> torch.Tensor:
    """Row blocks of `sizes` grown with zero rows or cut to `new` (one copy; none when equal)."""
    if sizes == new:
        return x
    parts = []
    for block, n, m in zip(x.split(sizes), sizes, new):
        parts.append(block[:m])
        if m > n:
            parts.append(x.new_zeros(m - n, *x.shape[1:]))
    return torch.cat(parts)


def stack_weights(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n, *w.shape] of n same-shaped weights, differentiable. When they lie in one storage at a
    constant, 16-byte aligned distance (what the optimizer's contiguous parameter buffer gives)
    this is a view: no copy of the weights per step, and none kept for the backward."""
    return _StackWeights.apply(*weights)


def _strided_view(weights: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    first = weights[0]
    if not first.is_contiguous() or first.device.type == "meta" or len(weights) < 2:
        return None
    step = weights[1].storage_offset() - first.storage_offset()
    size = first.element_size()
    if step < first.numel() or step * size % 16 or first.data_ptr() % 16:
        return None
    storage = first.untyped_storage().data_ptr()
    for i, w in enumerate(weights):
        if (w.shape != first.shape or w.stride() != first.stride() or w.dtype != first.dtype
                or w.untyped_storage().data_ptr() != storage
                or w.storage_offset() != first.storage_offset() + i * step):
            return None
    return first.as_strided((len(weights), *first.shape), (step, *first.stride()), first.storage_offset())


class _StackWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *weights: torch.Tensor) -> torch.Tensor:
        view = _strided_view(weights)
        return view if view is not None else torch.stack(weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.unbind(0)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, in] sorted by group, group g ending at offsets[g] (int32), times weight[g]^T
    ([G, out, in]): one `torch._grouped_mm`."""
    return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands a contiguous gradient to `_grouped_mm`'s backward, which
    rejects broadcast (stride 0) ones such as `out.sum()` gives."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


# ---- load balancing --------------------------------------------------------------------------------
def load_balancing_loss(scores: torch.Tensor, indices: torch.Tensor, coeff: float, score_function: str,
                        state: ParallelState) -> torch.Tensor:
    """Switch-style auxiliary loss with Megatron's normalisation, E * coeff * sum_e(P_e * f_e) on
    this rank's tokens; under SP the token counts are summed over TP so that the per-rank terms
    add up to the loss of the whole sequence (their router grads are summed over TP). Under CP the
    counts are summed over CP too, and each rank's term is cp times its share of the sequence's loss,
    like its LM loss (gradients are averaged over dp x cp)."""
    num_experts, k = scores.shape[1], indices.shape[1]
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).float()
    share = total = float(scores.shape[0])
    if state.config.sequence_parallel and state.tp_group is not None:
        dist.all_reduce(counts, group=state.tp_group)
        share, total = share * state.tp, total * state.tp
    if state.cp_group is not None:
        dist.all_reduce(counts, group=state.cp_group)
        total *= state.config.cp
    probs = scores / scores.sum(-1, keepdim=True) if score_function == "sigmoid" else scores
    return (probs.sum(0) * counts).sum() * (num_experts * coeff / (k * share * total))


class AuxLossScaler(torch.autograd.Function):
    """Identity on the activations that adds d(aux)/d(router) to the backward pass, so the
    load-balancing loss trains the router without entering the reported LM loss. `scale` is what
    the schedule multiplies the LM loss by (1 / micro-batches, times the fp16 loss scale)."""

    scale: float = 1.0

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, AuxLossScaler.scale)


def attach_aux_loss(x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    return AuxLossScaler.apply(x, aux)


def set_aux_loss_scale(scale: float) -> None:
    AuxLossScaler.scale = scale


@torch.no_grad()
def update_expert_biases(routers: Iterable[nn.Module], rate: float, state: ParallelState) -> None:
    """DeepSeek-V3's aux-loss-free balancing after each optimizer step: move every router's
    `expert_bias` by `rate` towards its under-loaded experts, on the load counted over all
    data-parallel and context-parallel ranks (and TP ranks under SP) since the last update."""
    for router in routers:
        bias: Optional[torch.Tensor] = getattr(router, "expert_bias", None)
        if bias is None:
            continue
        counts = router.tokens_per_expert.clone()
        for group in (state.dp_cp_group, state.tp_group if state.config.sequence_parallel else None):
            if group is not None:
                dist.all_reduce(counts, group=group)
        bias.add_(torch.sign(counts.mean() - counts).to(bias.dtype) * rate)
        router.tokens_per_expert.zero_()
