"""The memory-lean RMSNorm and vocab-parallel cross entropy: the same numbers as the plain autograd
versions (transformers' LlamaRMSNorm, torch's cross entropy), and only what they claim to keep for
backward, counted through autograd's saved-tensor hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mzoo.parallel import cross_entropy as CE
from mzoo.parallel.layers import apply_norm


def _reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, through plain autograd."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """fn(*args) and the bytes of the distinct tensors autograd saved for its backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


def _inputs(dtype: torch.dtype, shape=(16, 3, 64)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_autograd_reference(dtype):
    x, w = _inputs(dtype)
    xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))
    out, ref = apply_norm(x, w, None, "rmsnorm", 1e-5), _reference_rmsnorm(xr, wr, 1e-5)
    assert torch.equal(out, ref)  # the forward is the same arithmetic
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(dy)
    ref.backward(dy)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad)):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < tol, err


def test_rmsnorm_keeps_only_its_input_and_rstd():
    x, w = _inputs(torch.bfloat16)
    _, lean = _saved_bytes(apply_norm, x, w, None, "rmsnorm", 1e-5)
    _, plain = _saved_bytes(_reference_rmsnorm, x, w, 1e-5)
    rows = x.numel() // x.shape[-1]
    assert lean == x.numel() * 2 + w.numel() * 2 + rows * 4  # input (bf16), weight, fp32 rstd per row
    assert plain >= x.numel() * (4 + 2)  # autograd's: an fp32 copy of the input and the bf16 normalised tensor


def _ce_case(dtype: torch.dtype, vocab: int = 50, padded: int = 56):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(12, 2, padded, generator=g) * 4).to(dtype)
    target = torch.randint(0, vocab, (12, 2), generator=g)
    return logits, target, vocab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [CE.CHUNK_ELEMENTS, 56 * 5])  # one chunk, and chunks of 5 rows
def test_cross_entropy_matches_torch_on_the_true_vocabulary(monkeypatch, dtype, chunk):
    monkeypatch.setattr(CE, "CHUNK_ELEMENTS", chunk)
    logits, target, vocab = _ce_case(dtype)
    mine = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = CE.vocab_parallel_cross_entropy(mine, target, 0, vocab)
    want = F.cross_entropy(ref[..., :vocab].float().reshape(-1, vocab), target.reshape(-1), reduction="none")
    assert (loss.float().reshape(-1) - want).abs().max().item() < 1e-5
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * weights).sum().backward()
    (want * weights.reshape(-1)).sum().backward()
    assert mine.grad.dtype == dtype
    assert (mine.grad[..., vocab:] == 0).all()  # padding rows get no gradient
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (mine.grad.float() - ref.grad.float()).abs().max().item() < tol


def test_cross_entropy_keeps_no_fp32_softmax():
    logits, target, vocab = _ce_case(torch.bfloat16, vocab=1000, padded=1024)
    logits.requires_grad_()
    _, saved = _saved_bytes(CE.vocab_parallel_cross_entropy, logits, target, 0, vocab)
    tokens = target.numel()
    assert saved <= logits.numel() * 2 + tokens * (4 + 4 + 8 + 1)  # bf16 logits; max, sum, target id, mask
    assert saved < logits.numel() * 4  # an fp32 softmax alone would be twice the logits


def test_gated_activation_equals_autograd_and_keeps_less():
    from mzoo.parallel.layers import gated

    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 2, 40, generator=g).requires_grad_()
    href = h.detach().clone().requires_grad_()
    out, lean = _saved_bytes(gated, h, F.silu)

    def plain_glu(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    ref, plain = _saved_bytes(plain_glu, href)
    assert torch.equal(out, ref)
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)
    ref.backward(dy)
    assert torch.equal(h.grad, href.grad)
    assert lean == h.numel() * 4 and plain > lean  # fc1's output only, not silu(gate) as well

