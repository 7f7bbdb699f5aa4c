"""Fused torch ops stand in for hand-written ones only where they are bitwise the same: RMSNorm's
forward runs torch's `_fused_rms_norm` (F.rms_norm's kernel), checked here against the expression
transformers' LlamaRMSNorm computes, in fp32 and bf16, at the shapes mzoo's norms see (hidden
states [s, b, h], per-head q/k norms [s, b, heads, d], odd widths)."""

from __future__ import annotations

import pytest
import torch

from mzoo.parallel import layers
from mzoo.parallel.layers import Norm

SHAPES = [(32, 2, 64), (32, 2, 4, 16), (16, 1, 4096), (7, 3, 100), (5, 2, 5120)]


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: fp32 variance, rsqrt, back to the input dtype, times the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_this_torch_has_the_fused_op():
    assert layers._FUSED_RMS_NORM is not None  # else the test below compares the fallback with itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_is_bitwise_the_reference(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
    norm = Norm(shape[-1], "rmsnorm", 1e-5, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(shape[-1], generator=gen) * 0.1)  # not all ones
    out = norm(x)
    assert torch.equal(out, _reference(x, norm.weight, 1e-5))
    grad = torch.randn(shape, generator=gen).to(dtype)
    out.backward(grad)  # the hand-written backward reads the fused op's rstd: gradients as before
    ref_x = x.detach().clone().requires_grad_()
    ref_w = norm.weight.detach().clone().requires_grad_()
    _reference(ref_x, ref_w, 1e-5).backward(grad)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # the custom backward's own order (as before this op)
    assert torch.allclose(x.grad.float(), ref_x.grad.float(), rtol=tol, atol=tol)
    assert torch.allclose(norm.weight.grad.float(), ref_w.grad.float(), rtol=tol, atol=tol * 10)
