"""Expert-parallel plumbing for mixture-of-experts layers: token dispatch and combine over TP and
EP, the load-balancing loss and its backward hook, and the aux-loss-free bias update.

The model (models/moe.py) owns the router and the expert weights; this module moves tokens to
the ranks that hold their experts and back, with Megatron-Core's semantics:

- TP: every TP rank runs its shard of each expert on all of the TP group's tokens (gathered
  along the sequence under SP); partial outputs are summed (reduce-scattered under SP).
- EP: token copies sorted by expert go to the expert's rank through `all_to_all_single` with
  uneven splits; experts are numbered `ep_rank * E/EP + local`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from mzoo.parallel import collectives as C
from mzoo.parallel.state import ParallelState

RunExperts = Callable[[torch.Tensor, list[int]], torch.Tensor]  # rows sorted by local expert, counts


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
    """Sort token copies by expert, exchange them over EP, run the experts, send back, combine."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    source = order // k  # the token each sorted copy came from
    counts = torch.bincount(flat, minlength=num_experts)
    routed = tokens.index_select(0, source)
    ep, group = state.config.ep, state.ep_group
    if ep > 1 and group is not None:
        local = num_experts // ep
        send = counts.view(ep, local).sum(1).tolist()
        received = C.exchange_counts(counts, group).view(ep, local)  # [source rank, local expert]
        recv_sizes = received.sum(1).tolist()
        arrived = C.all_to_all(routed, recv_sizes, send, group)  # grouped by source rank, then expert
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=received.device).repeat(ep),
                                               received.reshape(-1))
        regroup = torch.argsort(expert_of_row, stable=True)
        out = run(arrived.index_select(0, regroup), received.sum(0).tolist())
        out = C.all_to_all(out.index_select(0, torch.argsort(regroup)), send, recv_sizes, group)
    else:
        out = run(routed, counts.tolist())
    out = out * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype)
    return tokens.new_zeros(tokens.shape).index_add(0, source, out)


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
