"""Tensor-parallel building blocks with Megatron-Core (Transformer-Engine spelling) parameter names.

Every parameter carries a ShardSpec (see sharding.py) so that the model itself declares how its
global tensors split. Activations use Megatron's [sequence, batch, hidden] layout so sequence
parallelism is a split along dim 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mzoo.parallel import collectives as C
from mzoo.parallel.sharding import REPLICATED, ShardSpec, set_spec
from mzoo.parallel.state import ParallelState


def rms_normalize(x32: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * rstd, rstd) over the last dim of an fp32 tensor, rstd = rsqrt(mean(x^2) + eps) [..., 1].
    torch's fused op (what F.rms_norm runs; one kernel on GPUs) where this torch has it: on the CPU
    it is the same pow -> mean -> add -> rsqrt -> mul, bitwise equal to the expression below
    (tests/models/test_fused_ops.py). Its backward has no CPU kernel, so _RMSNorm keeps its own."""
    if _FUSED_RMS_NORM is not None:
        return _FUSED_RMS_NORM(x32, [x32.shape[-1]], None, eps)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)


class _RMSNorm(torch.autograd.Function):
    """`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` computed in fp32, as transformers'
    LlamaRMSNorm, keeping only the input and the fp32 rstd per row for backward (plain autograd
    would keep an fp32 copy of the input and the normalised tensor: 3x the memory under bf16).
    The backward recomputes the normalised input from them, in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, rstd = rms_normalize(x.float(), eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            dims = tuple(range(grad.dim() - 1))
            grad_weight = (grad * normed.to(x.dtype)).float().sum(dims).to(weight.dtype)
        d_normed = grad.float() * weight.float()
        grad_x = rstd * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def apply_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: str, eps: float):
    """LayerNorm or RMSNorm; RMSNorm computes in fp32 like transformers' LlamaRMSNorm."""
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _RMSNorm.apply(x, weight, eps)


def _glu(h: torch.Tensor, act, clamp: Optional[float], offset: float) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    if clamp is not None:  # GPT-OSS: gate clamped above, the linear half on both sides
        gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
    return act(gate) * (up + offset if offset else up)


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up on fc1's output [gate; up], keeping only that output for backward and
    recomputing the activation there (Megatron's fused SwiGLU does the same): plain autograd would
    also keep act(gate), one more [tokens, ffn] tensor per layer. Same forward and gradients."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, act, clamp: Optional[float], offset: float) -> torch.Tensor:
        ctx.act, ctx.clamp, ctx.offset = act, clamp, offset
        ctx.save_for_backward(h)
        return _glu(h, act, clamp, offset)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        with torch.enable_grad():
            x = h.detach().requires_grad_()
            out = _glu(x, ctx.act, ctx.clamp, ctx.offset)
        (dh,) = torch.autograd.grad(out, x, grad)
        return dh, None, None, None


def gated(h: torch.Tensor, act, clamp: Optional[float] = None, offset: float = 0.0) -> torch.Tensor:
    """The gated activation of a [gate; up] fc1 output (SwiGLU, GeGLU; GPT-OSS's clamped form with
    `clamp` and act(gate) * (up + offset)). Inside a compiled layer it is the plain expression:
    dynamo cannot trace the custom backward's `autograd.grad`, and inductor's partitioner recomputes
    cheap pointwise ops such as act(gate) in backward instead of saving them."""
    if torch.compiler.is_compiling():
        return _glu(h, act, clamp, offset)
    return _GatedActivation.apply(h, act, clamp, offset)


def _param(shape: Sequence[int], spec: ShardSpec, dtype: Optional[torch.dtype]) -> nn.Parameter:
    return set_spec(nn.Parameter(torch.empty(*shape, dtype=dtype)), spec)


def mark_sequence_parallel(*params: Optional[torch.Tensor]) -> None:
    """Replicated parameters applied to sequence-sharded activations: under sequence parallelism
    each TP rank sees part of the sequence, so their grads must be summed over TP (Megatron's
    `sequence_parallel` attribute)."""
    for p in params:
        if p is not None:
            p.sequence_parallel = True  # type: ignore[attr-defined]


def mark_tensor_parallel_partial(*params: Optional[torch.Tensor]) -> None:
    """Replicated parameters applied to this TP rank's heads only (the per-head q/k norms): each
    rank's grad covers its own heads, so they are summed over TP with or without sequence
    parallelism (what Megatron's finalize_model_grads does for qk_layernorm)."""
    for p in params:
        if p is not None:
            p.tensor_parallel_partial = True  # type: ignore[attr-defined]


def summed_over_tp(p: torch.Tensor, sequence_parallel: bool) -> bool:
    """Whether p's gradient is a partial sum that the TP ranks must add up."""
    return getattr(p, "tensor_parallel_partial", False) or (sequence_parallel and getattr(p, "sequence_parallel", False))


class Norm(nn.Module):
    """Stand-alone norm (`final_layernorm`, q/k norms): parameters `weight` (+ `bias`)."""

    def __init__(self, size: int, kind: str, eps: float, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = _param((size,), REPLICATED, dtype)
        self.bias = _param((size,), REPLICATED, dtype) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_norm(x, self.weight, self.bias, self.kind, self.eps)


class ColumnParallelLinear(nn.Module):
    """Y = X W^T with W split by rows (output features) over TP. `sections` splits fused outputs
    ([gate; up]) per section so each rank gets matching slices of every part."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        state: ParallelState,
        bias: bool = False,
        sections: Optional[Sequence[int]] = None,
        gather_output: bool = False,
        vocab: bool = False,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        tp = state.tp
        if out_features % tp or (sections and any(s % tp for s in sections)):
            raise ValueError(f"output size {out_features} (sections {sections}) does not split over TP={tp}")
        self.state, self.gather_output = state, gather_output
        spec = ShardSpec("tp", 0, tuple(sections) if sections else None, vocab=vocab)
        self.weight = _param((out_features // tp, in_features), spec, dtype)
        self.bias = _param((out_features // tp,), ShardSpec("tp", 0, spec.sections), dtype) if bias else None
        self.lora: Optional[nn.Module] = None  # low-rank adapters (mzoo/parallel/lora.py): base names stay canonical

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.config.sequence_parallel:
            return C.gather_from_sp(x, self.state.tp_group)
        return C.copy_to_tp(x, self.state.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._input(x), self.weight, self.bias)
        if self.lora is not None:  # on this rank's input: the adapter applies the collectives to A x
            y = y + self.lora(x, y)
        return C.gather_from_tp(y, self.state.tp_group) if self.gather_output else y


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """Norm fused in front of a column-parallel linear (TE's LayerNormLinear): the norm parameters
    are `layer_norm_weight` / `layer_norm_bias`, the spelling Megatron's TE spec uses."""

    def __init__(self, in_features: int, out_features: int, state: ParallelState, norm: str, eps: float, **kw):
        super().__init__(in_features, out_features, state, **kw)
        self.norm_kind, self.eps = norm, eps
        dtype = kw.get("dtype")
        self.layer_norm_weight = _param((in_features,), REPLICATED, dtype)
        self.layer_norm_bias = _param((in_features,), REPLICATED, dtype) if norm == "layernorm" else None
        mark_sequence_parallel(self.layer_norm_weight, self.layer_norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = apply_norm(x, self.layer_norm_weight, self.layer_norm_bias, self.norm_kind, self.eps)
        return super().forward(x)


class RowParallelLinear(nn.Module):
    """Y = X W^T with W split by columns (input features) over TP; partial sums are reduced
    (reduce-scattered along the sequence under sequence parallelism). Bias is added once."""

    def __init__(
        self, in_features: int, out_features: int, state: ParallelState, bias: bool = False, dtype=None
    ):
        super().__init__()
        if in_features % state.tp:
            raise ValueError(f"input size {in_features} does not split over TP={state.tp}")
        self.state = state
        self.weight = _param((out_features, in_features // state.tp), ShardSpec("tp", 1), dtype)
        self.bias = _param((out_features,), REPLICATED, dtype) if bias else None
        mark_sequence_parallel(self.bias)
        self.lora: Optional[nn.Module] = None  # low-rank adapter (mzoo/parallel/lora.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.state.config.sequence_parallel:
            y = C.reduce_scatter_to_sp(y, self.state.tp_group)
        else:
            y = C.reduce_from_tp(y, self.state.tp_group)
        if self.lora is not None:
            y = y + self.lora(x, y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split over TP; each rank looks up its own rows."""

    def __init__(self, padded_vocab: int, hidden: int, state: ParallelState, dtype=None):
        super().__init__()
        if padded_vocab % state.tp:
            raise ValueError(f"padded vocabulary {padded_vocab} does not split over TP={state.tp}")
        self.state = state
        self.rows = padded_vocab // state.tp
        self.start = state.tp_rank * self.rows
        self.weight = _param((self.rows, hidden), ShardSpec("tp", 0, vocab=True), dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.state.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return C.reduce_from_tp(out, self.state.tp_group)
