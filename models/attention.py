"""GPT-OSS's core attention: learned sinks in the softmax and a sliding window (Megatron-Core's
DotProductAttention with softmax_type "learnable" and window_size (w - 1, 0)).

A sink is one learned logit per head that joins every query's softmax and is then dropped, so
the probabilities of the real keys sum to less than one (Megatron's SoftmaxOne, transformers'
eager GptOss attention). A windowed layer lets query i see keys j with i - w < j <= i. SDPA takes
neither, so this path computes the scores explicitly ([b, h, s, s] per layer): exact, the
reference; dropout is drawn on the probabilities after the sink is dropped, as both references do.
Under context parallelism the tiled attention (mzoo/parallel/blockwise.py) computes both exactly
(`Layout.validate_for` refuses attention dropout there, as for every model).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mzoo.config import ModelConfig
from mzoo.parallel.context import ContextParallelAttention
from mzoo.parallel.sharding import ShardSpec, set_spec
from mzoo.parallel.state import ParallelState

HEADS = ShardSpec(axis="tp", dim=0)  # one value per head: each TP rank holds its heads' sinks


class CoreAttention(nn.Module):
    """Holds `softmax_offset` [heads / tp] (the sinks) when the config has them, and this layer's window."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, layer: int, dtype=None):
        super().__init__()
        self.window = cfg.window_size if cfg.is_window_layer(layer) else None
        self.softmax_offset: Optional[nn.Parameter] = None
        if cfg.softmax_type == "learnable":
            heads = cfg.num_attention_heads // state.tp
            self.softmax_offset = set_spec(nn.Parameter(torch.empty(heads, dtype=dtype)), HEADS)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout: float,
                state: ParallelState, scale: Optional[float] = None) -> torch.Tensor:
        """q [b, h, s, d], k/v [b, g, sk, d] (the last s keys are the queries' own positions),
        `mask` [b, 1, s, sk] bool or None (causal), or this CP rank's chunks -> [b, h, s, d]."""
        if isinstance(mask, ContextParallelAttention):  # tiled, with the sink and the window
            return mask(q, k, v, scale, self.softmax_offset, self.window)
        s, sk = q.shape[2], k.shape[2]
        allowed = causal_window_mask(s, sk, self.window, q.device)
        if mask is not None:
            allowed = allowed & mask
        per = q.shape[1] // k.shape[1]
        if per > 1:
            k, v = k.repeat_interleave(per, dim=1), v.repeat_interleave(per, dim=1)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        if self.softmax_offset is not None:
            sink = self.softmax_offset.to(scores.dtype).reshape(1, -1, 1, 1).expand(q.shape[0], -1, s, 1)
            scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if self.softmax_offset is not None:
            probs = probs[..., :-1]
        if dropout:
            probs = _dropout_in_rank_stream(probs, dropout, state)
        return torch.matmul(probs.to(v.dtype), v)


@torch.compiler.disable
def _dropout_in_rank_stream(probs: torch.Tensor, p: float, state: ParallelState) -> torch.Tensor:
    """Dropout on this rank's heads from its own stream; eager inside a compiled layer, as
    models/gpt.py's `_attention_with_dropout` (the tracker swaps generator states in Python)."""
    with state.rng.fork():
        return torch.nn.functional.dropout(probs, p, True)


def causal_window_mask(s: int, sk: int, window: Optional[int], device) -> torch.Tensor:
    """[s, sk] bool: query i (at key position sk - s + i) sees key j when j <= its position and,
    with a window w, j > its position - w (transformers' sliding_window_overlay, Megatron's (w - 1, 0))."""
    pos = torch.arange(s, device=device)[:, None] + (sk - s)
    keys = torch.arange(sk, device=device)[None, :]
    allowed = keys <= pos
    if window is not None:
        allowed = allowed & (keys > pos - window)
    return allowed
