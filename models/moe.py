"""Mixture of experts, Megatron-Core style: router -> token dispatch (all-to-all over EP) -> experts.

Names follow Megatron-Core's MoE layer (`mlp.router.weight`, `mlp.router.expert_bias`,
`mlp.experts.local_experts.{i}.linear_fc1.weight`, `mlp.shared_experts.*`), so the same state dict
loads in Megatron with the SequentialMLP experts. Routing reproduces the reference models exactly:

- Mixtral: softmax over all experts, top-k, renormalised.
- DeepSeek-V2: softmax, top-k (greedy, or group-limited with the group's best expert as its score),
  scaled by routed_scaling_factor, not renormalised.
- DeepSeek-V3: sigmoid, `expert_bias` added for the choice only, groups scored by their two best
  experts, top-k weights renormalised and scaled.

Experts are numbered `ep_rank * E/EP + local`; each rank holds E/EP experts, each split over TP like
a dense MLP. Tokens reach their experts through `all_to_all_single` with uneven splits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mzoo.config import ModelConfig
from mzoo.parallel import experts as E
from mzoo.parallel.layers import ColumnParallelLinear, RowParallelLinear, gated, mark_sequence_parallel
from mzoo.parallel.sharding import REPLICATED, set_spec
from mzoo.parallel.state import ParallelState


class Router(nn.Module):
    """Scores every expert per token and picks top-k; computes in fp32 as the references do."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype=None):
        super().__init__()
        moe = cfg.moe
        self.moe, self.state = moe, state
        self.weight = set_spec(nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size, dtype=dtype)), REPLICATED)
        mark_sequence_parallel(self.weight)  # under SP each TP rank routes its own tokens
        self.expert_bias: Optional[nn.Parameter] = None
        if moe.expert_bias:  # aux-loss-free balancing: moved by update_expert_bias, never by gradients
            self.expert_bias = set_spec(
                nn.Parameter(torch.zeros(moe.num_experts, dtype=torch.float32), requires_grad=False), REPLICATED
            )
        self.bias: Optional[nn.Parameter] = None
        if cfg.add_bias_linear:  # GPT-OSS: the router is a linear with bias (Megatron's TopKRouter.bias)
            self.bias = set_spec(nn.Parameter(torch.empty(moe.num_experts, dtype=dtype)), REPLICATED)
            mark_sequence_parallel(self.bias)
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.float64), persistent=False)
        self.aux_loss: Optional[torch.Tensor] = None  # last load-balancing loss (detached), for logging

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return logits.sigmoid() if self.moe.score_function == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] fp32, expert indices [T, k], scores [T, E] fp32)."""
        moe = self.moe
        scores = self.scores(x)
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        if moe.n_group is not None:
            choice = self._limit_groups(choice)
        indices = torch.topk(choice.detach(), moe.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if moe.routed_scaling_factor != 1.0:
            weights = weights * moe.routed_scaling_factor
        return weights, indices, scores

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the topk_group best groups (DeepSeek's group-limited routing); a
        group scores its best expert (V2, softmax) or the sum of its best two (V3, sigmoid)."""
        moe = self.moe
        grouped = choice.detach().view(choice.shape[0], moe.n_group, -1)
        if moe.score_function == "sigmoid":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(moe.topk_group, dim=-1).indices, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice)
        return choice.masked_fill(~keep, float("-inf"))


class Expert(nn.Module):
    """One expert's weights, split over TP like a dense MLP; the MoE layer does the TP
    communication once for all experts, so these linears are used as plain weights. With
    add_bias_linear (GPT-OSS) fc1's bias splits with its rows and fc2's is added by TP rank 0 only,
    before the layer's TP reduction, so it counts once (see `_add_on_first_rank`)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ffn: int, dtype=None):
        super().__init__()
        gated = cfg.gated
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, ffn * (2 if gated else 1), state,
                                               bias=cfg.add_bias_linear, sections=(ffn, ffn) if gated else None,
                                               dtype=dtype)
        self.linear_fc2 = RowParallelLinear(ffn, cfg.hidden_size, state, bias=cfg.add_bias_linear, dtype=dtype)
        if self.linear_fc2.bias is not None:  # its grad is whole on every TP rank: never summed over TP
            self.linear_fc2.bias.sequence_parallel = False
        for p in self.parameters():
            p.expert_parallel = True  # differs across EP ranks: reduced over expert-data-parallel ranks


class _AddOnFirstRank(torch.autograd.Function):
    """x + bias on TP rank 0, x elsewhere: the partial sums reduced over TP then hold the bias once.
    The gradient of the partial outputs is the same on every TP rank (the reduction's backward
    copies it), so every rank's bias gets the whole gradient, as a replicated parameter must."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, add: bool) -> torch.Tensor:
        return x + bias if add else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.sum(0), None


def _add_on_first_rank(x: torch.Tensor, bias: Optional[torch.Tensor], state: ParallelState) -> torch.Tensor:
    return x if bias is None else _AddOnFirstRank.apply(x, bias, state.tp_rank == 0)


class Experts(nn.Module):
    """This EP rank's experts (SequentialMLP naming), run as one grouped GEMM per linear
    (`torch._grouped_mm`, Megatron's --moe-grouped-gemm) where `E.grouped_gemm_supported` says the
    device and dtype allow it, else one matmul per expert: the reference, the same numbers."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype=None):
        super().__init__()
        from mzoo.models.gpt import ACTIVATIONS, glu_options

        self.gated, self.act, self.glu, self.state = cfg.gated, ACTIVATIONS[cfg.activation], glu_options(cfg), state
        count = cfg.moe.num_experts // state.config.ep
        self.local_experts = nn.ModuleList(Expert(cfg, state, cfg.moe.ffn_hidden_size, dtype) for _ in range(count))
        # None: the grouped GEMM where it pays (CUDA's CUTLASS kernel); True: wherever torch runs it
        # (the CPU too: equal to the loop, not faster, ~270 MB more peak per 4096-token layer in
        # fp32, docs/benchmarks.md); False: always the per-expert loop, the CPU reference
        self.grouped_gemm: Optional[bool] = None

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return gated(h, self.act, *self.glu)
        return self.act(h)

    def forward(self, x: torch.Tensor, sizes: list[int], counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] sorted by local expert, `sizes` rows each (`counts`: the same on x's device) ->
        partial outputs [N, H] (summed over TP later)."""
        if self.uses_grouped_gemm(x):
            experts = self.local_experts
            biased = experts[0].linear_fc1.bias is not None
            return E.grouped_mlp(x, sizes, counts, [e.linear_fc1.weight for e in experts],
                                 [e.linear_fc2.weight for e in experts], self._ffn, E.grouped_row_multiple(x.device),
                                 [e.linear_fc1.bias for e in experts] if biased else None,
                                 [e.linear_fc2.bias for e in experts] if biased else None, self.state.tp_rank == 0)
        outs = []
        for expert, part in zip(self.local_experts, x.split(sizes)):
            h = self._ffn(F.linear(part, expert.linear_fc1.weight, expert.linear_fc1.bias))
            outs.append(_add_on_first_rank(F.linear(h, expert.linear_fc2.weight), expert.linear_fc2.bias, self.state))
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])

    def uses_grouped_gemm(self, x: torch.Tensor) -> bool:
        if self.grouped_gemm is False or len(self.local_experts) < 2:
            return False
        if self.grouped_gemm is None and x.device.type != "cuda":
            return False
        fc2 = self.local_experts[0].linear_fc2.weight  # [H, F / tp]
        return fc2.dtype == x.dtype and E.grouped_gemm_supported(x.device, x.dtype, fc2.shape)


class MoELayer(nn.Module):
    """Routed experts (+ shared experts) on [s, b, h] activations (sequence-sharded under SP)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype=None):
        super().__init__()
        from mzoo.models.gpt import MLP

        self.cfg, self.state = cfg, state
        self.router = Router(cfg, state, dtype)
        self.experts = Experts(cfg, state, dtype)
        moe = cfg.moe
        self.shared_experts = None
        if moe.num_shared_experts:
            width = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size)
            self.shared_experts = MLP(cfg, state, width, dtype, fused_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        tokens = x.reshape(-1, h)
        moe = self.cfg.moe
        weights, indices, scores = self.router(tokens)
        if self.training and torch.is_grad_enabled() and moe.aux_loss_coeff:
            aux = E.load_balancing_loss(scores, indices, moe.aux_loss_coeff, moe.score_function, self.state)
            self.router.aux_loss = aux.detach()
            tokens = E.attach_aux_loss(tokens, aux)
        if self.training and self.router.expert_bias is not None and not self.state.rng.recomputing:
            self.router.tokens_per_expert += torch.bincount(indices.reshape(-1), minlength=moe.num_experts)
        out = E.routed_experts(tokens, weights, indices, moe.num_experts, self.state, self.experts)
        out = out.view(-1, b, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
