"""The tiled online-softmax attention behind context parallelism equals plain causal SDPA (values and
gradients, fp32), for the load-balanced chunks of every CP rank, with GQA and packed segments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mzoo.parallel.blockwise import blockwise_attention
from mzoo.parallel.context import chunk_indices, gathered_indices
from mzoo.parallel.state import ParallelState

B, S = 2, 24


def _inputs(hq: int, hk: int, d: int = 8, dv: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, S, d, generator=gen, dtype=torch.float64).float()
    k = torch.randn(B, hk, S, d, generator=gen, dtype=torch.float64).float()
    v = torch.randn(B, hk, S, dv, generator=gen, dtype=torch.float64).float()
    grad = torch.randn(B, hq, S, dv, generator=gen, dtype=torch.float64).float()
    return q, k, v, grad


def _segments() -> torch.Tensor:
    """Packed rows: three documents in the first, one long and a short one in the second."""
    first = torch.tensor([0] * 5 + [1] * 11 + [2] * 8)
    second = torch.tensor([0] * 19 + [1] * 5)
    return torch.stack([first, second])


def _reference(q, k, v, segments):
    """SDPA with the causal (and within-segment) mask on the whole sequence."""
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    if segments is not None:
        mask = mask & (segments[:, :, None] == segments[:, None, :])
    mask = mask.expand(B, S, S).unsqueeze(1)
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _grads(out, grad, *tensors):
    return torch.autograd.grad(out, tensors, grad)


@pytest.mark.parametrize("cp", [1, 2, 3])
@pytest.mark.parametrize("tile", [512, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_every_cp_rank_matches_sdpa(cp, tile, packed, heads):
    """Each rank's queries (its two chunks) over the all-gathered keys give that rank's rows of the
    full causal attention, and the gradients add up to SDPA's over the ranks."""
    q, k, v, grad = _inputs(*heads)
    segments = _segments() if packed else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves, segments)
    ref_grads = _grads(ref, grad, *leaves)

    keys = gathered_indices(S, cp)  # the order an all-gather over the CP group produces
    kq, kk, kv = (t.clone().requires_grad_() for t in (q, k[:, :, keys], v[:, :, keys]))
    k_seg = segments[:, keys] if packed else None
    total = [torch.zeros_like(t) for t in (q, k, v)]
    for rank in range(cp):
        rows = chunk_indices(S, cp, rank)
        q_seg = segments[:, rows] if packed else None
        out = blockwise_attention(kq[:, :, rows], kk, kv, rows, keys, q_seg, k_seg, tile=tile)
        torch.testing.assert_close(out, ref[:, :, rows].detach(), rtol=0, atol=2e-6)
        dq, dk, dv = _grads(out, grad[:, :, rows], kq, kk, kv)
        total[0] += dq
        total[1][:, :, keys] += dk  # back to sequence order
        total[2][:, :, keys] += dv
    for got, want in zip(total, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=5e-6)


def test_value_dim_and_scale_differ_from_query_dim():
    """Multi-latent attention: values narrower than queries and keys, and a softmax scale of its own."""
    q, k, v, grad = _inputs(4, 4, d=12, dv=6, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=0.2)
    idx = torch.arange(S)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    out = blockwise_attention(*mine, idx, idx, scale=0.2, tile=5)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=2e-6)
    for got, want in zip(_grads(out, grad, *mine), _grads(ref, grad, *leaves)):
        torch.testing.assert_close(got, want, rtol=0, atol=5e-6)


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v, _ = _inputs(4, 2)
    idx = torch.arange(S)
    out = blockwise_attention(*(t.bfloat16() for t in (q, k, v)), idx, idx, tile=4)
    assert out.dtype == torch.bfloat16
    ref = _reference(q, k, v, None)
    assert (out.float() - ref).abs().max() < 3e-2


def test_tiles_above_the_diagonal_are_skipped():
    """With tile = chunk, the CP2 rank 0 queries (chunks 0 and 3) skip the key tiles of chunks 1-3
    for chunk 0: 2 x 4 pairs minus 3 skipped = 5 tile products, not 8."""
    from mzoo.parallel.blockwise import _pairs, _tiles

    keys, rows = gathered_indices(S, 2), chunk_indices(S, 2, 0)
    pairs = list(_pairs(_tiles(rows, 6), _tiles(keys, 6), segmented=False))
    assert len(pairs) == 5
    assert sum(masked for *_, masked in pairs) == 2  # the two diagonal tiles; the rest need no mask


def test_chunks_are_megatrons_load_balanced_split():
    assert chunk_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(gathered_indices(24, 3).tolist()) == list(range(24))
    state = ParallelState.single()
    assert chunk_indices(8, state.config.cp, state.cp_rank).tolist() == list(range(8))


def _sink_window_reference(q, k, v, sinks, window):
    """GPT-OSS's eager attention (models/attention.py, itself equal to transformers' GptOss)."""
    from mzoo.config import ModelConfig
    from mzoo.models.attention import CoreAttention

    heads, groups = q.shape[1], k.shape[1]
    cfg = ModelConfig(family="gpt_oss", hidden_size=heads * 8, num_layers=1, num_attention_heads=heads,
                      num_query_groups=groups, softmax_type="learnable", window_size=window)
    core = CoreAttention(cfg, ParallelState.single(), 0)
    del core.softmax_offset  # the test's leaf tensor in its place, so its gradient is the test's
    core.softmax_offset = sinks
    return core(q, k, v, None, 0.0, ParallelState.single())


@pytest.mark.parametrize("cp, tile", [(1, 512), (2, 5), (3, 3)])
@pytest.mark.parametrize("window", [None, 1, 5], ids=["sinks", "sinks-window1", "sinks-window5"])
def test_sinks_and_window_match_the_eager_path(cp, tile, window):
    """GPT-OSS under CP: per-head sinks in every row's denominator and a sliding window in the tile
    mask give the eager path's output and gradients (sinks' own included) on every rank's rows."""
    q, k, v, grad = _inputs(4, 2, seed=5)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1)) * 2
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref = _sink_window_reference(*leaves, window)
    ref_grads = _grads(ref, grad, *leaves)
    keys = gathered_indices(S, cp)
    kq, kk, kv, ks = (t.clone().requires_grad_() for t in (q, k[:, :, keys], v[:, :, keys], sinks))
    total = [torch.zeros_like(t) for t in (q, k, v, sinks)]
    for rank in range(cp):
        rows = chunk_indices(S, cp, rank)
        out = blockwise_attention(kq[:, :, rows], kk, kv, rows, keys, tile=tile, sinks=ks, window=window)
        torch.testing.assert_close(out, ref[:, :, rows].detach(), rtol=0, atol=2e-6)
        dq, dk, dv, dsink = _grads(out, grad[:, :, rows], kq, kk, kv, ks)
        total[0] += dq
        total[1][:, :, keys] += dk
        total[2][:, :, keys] += dv
        total[3] += dsink
    for got, want in zip(total, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=5e-6)


def test_tiles_outside_the_window_are_skipped():
    """One process, 24 keys in tiles of 4, window 4: a query tile sees its own tile and the one before."""
    from mzoo.parallel.blockwise import _pairs, _tiles

    idx = torch.arange(S)
    pairs = list(_pairs(_tiles(idx, 4), _tiles(idx, 4), segmented=False, window=4))
    assert len(pairs) == 6 * 2 - 1
