"""Causal attention computed tile by tile with an online softmax (flash-attention's algorithm in plain
torch), for context parallelism: no pass ever holds more than one tile of scores.

Queries and keys carry their *global sequence index* (where the token sits in the whole, unsplit
sequence), so the same function serves one process (indices 0..s-1) and a context-parallel rank
whose queries are two load-balanced chunks and whose keys were all-gathered from every rank. A key
is visible to a query when its index is not later and, with packed sequences, its segment id is the
same. A tile whose keys all come after its queries is skipped; one whose keys all come before is
computed without a mask.

The forward keeps, per query row, the running max and sum of exp and returns the log-sum-exp; the
backward recomputes each tile's probabilities from it, P = exp(S - lse), and uses
dS = P * (dP - rowsum(dO * O)) (FlashAttention-2), so neither pass materialises s_q x s_k scores.
Scores and accumulators are fp32 whatever the input dtype. Grouped-query attention is native: query
heads are viewed as [kv heads, queries per group], keys are never repeated.

GPT-OSS's two variants are exact here too. A sliding window of w keys hides keys w or more positions
before the query (tiles wholly outside are skipped, like the causal ones). A sink (one learned logit
per head, value zero) joins each row's denominator at the end: lse = logaddexp(lse of the keys,
sink), the output scaled by exp(lse of the keys - lse); the backward is unchanged given that lse
(the sink adds nothing to rowsum(dO * O)), and the sink's own gradient is -sum(p_sink * rowsum(dO * O)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

DEFAULT_TILE = 512  # rows and columns of one score tile


@dataclass(frozen=True)
class _Tile:
    lo: int
    hi: int
    first: int  # smallest and largest global index in the tile
    last: int


def _tiles(index: torch.Tensor, size: int) -> list[_Tile]:
    """Consecutive slices of at most `size` positions with their index range (one host sync per call)."""
    bounds = list(range(0, index.shape[0], size))
    if not bounds:
        return []
    lows = torch.stack([index[lo : lo + size].min() for lo in bounds]).tolist()
    highs = torch.stack([index[lo : lo + size].max() for lo in bounds]).tolist()
    return [_Tile(lo, min(lo + size, index.shape[0]), a, b) for lo, a, b in zip(bounds, lows, highs)]


def _pairs(q_tiles: list[_Tile], k_tiles: list[_Tile], segmented: bool,
           window: Optional[int] = None) -> Iterator[tuple[_Tile, _Tile, bool]]:
    """(query tile, key tile, needs a mask) for every tile pair with at least one visible key."""
    for qt in q_tiles:
        for kt in k_tiles:
            if kt.first > qt.last:  # every key after every query: nothing visible
                continue
            if window is not None and kt.last <= qt.first - window:  # every key before every window
                continue
            outside = window is not None and kt.first <= qt.last - window
            yield qt, kt, segmented or kt.last > qt.first or outside


def _mask(q_index: torch.Tensor, k_index: torch.Tensor, q_seg: Optional[torch.Tensor],
          k_seg: Optional[torch.Tensor], qt: _Tile, kt: _Tile, window: Optional[int] = None) -> torch.Tensor:
    """[b or 1, 1, 1, tq, tk] bool: key not later than query (and fewer than `window` before it), and
    in the same segment."""
    behind = q_index[qt.lo : qt.hi, None] - k_index[None, kt.lo : kt.hi]
    visible = behind >= 0
    if window is not None:
        visible = visible & (behind < window)
    if q_seg is not None:
        visible = visible & (q_seg[:, qt.lo : qt.hi, None] == k_seg[:, None, kt.lo : kt.hi])
    else:
        visible = visible.unsqueeze(0)
    return visible[:, None, None]


class BlockwiseAttention(torch.autograd.Function):
    """q [b, hq, sq, d], k [b, hk, sk, d], v [b, hk, sk, dv] -> [b, hq, sq, dv]."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, k_index, q_seg, k_seg, scale, tile, sinks=None, window=None):
        b, hq, sq, d = q.shape
        hk, dv = k.shape[1], v.shape[-1]
        g = hq // hk
        q5 = q.reshape(b, hk, g, sq, d)
        q_tiles, k_tiles = _tiles(q_index, tile), _tiles(k_index, tile)
        out = torch.zeros(b, hk, g, sq, dv, dtype=torch.float32, device=q.device)
        lse = torch.full((b, hk, g, sq), float("-inf"), dtype=torch.float32, device=q.device)
        row_max = torch.full_like(lse, float("-inf"))
        row_sum = torch.zeros_like(lse)
        for qt, kt, masked in _pairs(q_tiles, k_tiles, q_seg is not None, window):
            rows = slice(qt.lo, qt.hi)
            qs = q5[..., rows, :].float()
            ks, vs = k[:, :, None, kt.lo : kt.hi].float(), v[:, :, None, kt.lo : kt.hi].float()
            s = torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale)  # [b, hk, g, tq, tk]
            if masked:
                s.masked_fill_(~_mask(q_index, k_index, q_seg, k_seg, qt, kt, window), float("-inf"))
            m_old = row_max[..., rows]
            m_new = torch.maximum(m_old, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing yet
            p = torch.exp(s - m_safe[..., None])
            keep = torch.exp(m_old - m_safe)
            row_sum[..., rows] = row_sum[..., rows] * keep + p.sum(-1)
            out[..., rows, :] = out[..., rows, :] * keep[..., None] + torch.matmul(p, vs)
            row_max[..., rows] = m_new
        seen = row_sum > 0  # every row sees at least its own key; guard the impossible empty row anyway
        out = torch.where(seen[..., None], out / row_sum.clamp(min=1e-30)[..., None], torch.zeros_like(out))
        lse = torch.where(seen, row_max + torch.log(row_sum.clamp(min=1e-30)), torch.full_like(lse, float("inf")))
        if sinks is not None:  # the sink's exp joins every row's denominator
            total = torch.logaddexp(lse, sinks.float().reshape(1, hk, g, 1))
            out, lse = out * torch.exp(lse - total)[..., None], total
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, q_index, k_index,
                              *(t for t in (q_seg, k_seg, sinks) if t is not None))
        ctx.segmented, ctx.scale, ctx.tile = q_seg is not None, scale, tile
        ctx.has_sinks, ctx.window = sinks is not None, window
        return out.reshape(b, hq, sq, dv)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_index, k_index, *rest = ctx.saved_tensors
        sinks = rest.pop() if ctx.has_sinks else None
        q_seg, k_seg = rest if ctx.segmented else (None, None)
        scale = ctx.scale
        b, hk, g, sq, dv = out.shape
        q5 = q.reshape(b, hk, g, sq, q.shape[-1])
        do = grad_out.reshape(b, hk, g, sq, dv).float()
        delta = (do * out.float()).sum(-1)  # rowsum(dO * O) [b, hk, g, sq]
        dq = torch.zeros(q5.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dvv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        q_tiles, k_tiles = _tiles(q_index, ctx.tile), _tiles(k_index, ctx.tile)
        for qt, kt, masked in _pairs(q_tiles, k_tiles, ctx.segmented, ctx.window):
            rows, cols = slice(qt.lo, qt.hi), slice(kt.lo, kt.hi)
            qs = q5[..., rows, :].float()
            ks, vs = k[:, :, None, cols].float(), v[:, :, None, cols].float()
            s = torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale)
            if masked:
                s.masked_fill_(~_mask(q_index, k_index, q_seg, k_seg, qt, kt, ctx.window), float("-inf"))
            p = torch.exp(s - lse[..., rows, None])  # masked: exp(-inf) = 0
            dos = do[..., rows, :]
            dvv[:, :, cols] += torch.matmul(p.transpose(-1, -2), dos).sum(2)
            ds = p * (torch.matmul(dos, vs.transpose(-1, -2)) - delta[..., rows, None])
            dq[..., rows, :] += torch.matmul(ds, ks) * scale
            dk[:, :, cols] += torch.matmul(ds.transpose(-1, -2), qs).sum(2) * scale
        dsinks = None
        if sinks is not None:  # p_sink = exp(sink - lse); d sink = -sum(p_sink * delta)
            p_sink = torch.exp(sinks.float().reshape(1, hk, g, 1) - lse)
            dsinks = -(p_sink * delta).sum((0, 3)).reshape(-1).to(sinks.dtype)
        return (dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype),
                None, None, None, None, None, None, dsinks, None)


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_index: torch.Tensor,
                        k_index: torch.Tensor, q_segments: Optional[torch.Tensor] = None,
                        k_segments: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        tile: int = DEFAULT_TILE, sinks: Optional[torch.Tensor] = None,
                        window: Optional[int] = None) -> torch.Tensor:
    """Causal (by global index) attention of q [b, hq, sq, d] over k, v [b, hk, sk, d|dv]; with
    segments [b, sq] / [b, sk], only within a segment; with `window`, over the last `window` keys up
    to the query; `sinks` [hq]: one logit per head in every row's softmax (GPT-OSS). hq must be a
    multiple of hk (GQA)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads.")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("give segment ids for both queries and keys, or for neither.")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return BlockwiseAttention.apply(q, k, v, q_index, k_index, q_segments, k_segments, scale, tile, sinks, window)
