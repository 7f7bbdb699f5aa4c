"""Multi-latent attention (DeepSeek V2/V3) with Megatron-Core's names and TP over heads.

Queries come from a low-rank path (linear_q_down_proj -> norm -> linear_q_up_proj) or directly
(linear_q_proj, V2-Lite); keys and values from a shared latent (linear_kv_down_proj, whose last
qk_rope_head_dim rows are one rotary key shared by all heads) expanded per head by
linear_kv_up_proj. The down projections are replicated and run on this rank's tokens (sequence
shard under SP, like a norm); the up projections are column-parallel over heads. Rotary channels
are stored interleaved in pairs (DeepSeek's checkpoints), so they are de-interleaved before the
rotate-half rotation, as Megatron's MLA and transformers' DeepSeek-V3 do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mzoo.config import ModelConfig
from mzoo.parallel import collectives as C
from mzoo.parallel.layers import (
    ColumnParallelLinear,
    LayerNormColumnParallelLinear,
    RowParallelLinear,
    mark_sequence_parallel,
)
from mzoo.parallel.random import checkpoint_with_rng
from mzoo.parallel.sharding import REPLICATED, set_spec
from mzoo.parallel.state import ParallelState
from mzoo.models.rope import _yarn_mscale, apply_rotary


class ReplicatedLinear(nn.Module):
    """A linear every TP rank holds whole, applied to this rank's tokens (TE's 'duplicated')."""

    def __init__(self, in_features: int, out_features: int, dtype=None):
        super().__init__()
        self.weight = set_spec(nn.Parameter(torch.empty(out_features, in_features, dtype=dtype)), REPLICATED)
        mark_sequence_parallel(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times yarn's mscale(factor, mscale_all_dim)^2 as DeepSeek sets it."""
    mla, rope = cfg.mla, cfg.rope
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if rope.scaling == "yarn" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MLASelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype=None):
        super().__init__()
        mla, heads, h = cfg.mla, cfg.num_attention_heads, cfg.hidden_size
        self.nope, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora = mla.kv_lora_rank
        self.heads = heads // state.tp
        qk = self.nope + self.rope_dim
        norm = dict(norm=cfg.normalization, eps=cfg.norm_eps, dtype=dtype)
        if mla.q_lora_rank is not None:
            self.linear_q_down_proj = ReplicatedLinear(h, mla.q_lora_rank, dtype)
            self.linear_q_up_proj = LayerNormColumnParallelLinear(mla.q_lora_rank, heads * qk, state, **norm)
            self.linear_q_proj = None
        else:
            self.linear_q_down_proj = self.linear_q_up_proj = None
            self.linear_q_proj = ColumnParallelLinear(h, heads * qk, state, dtype=dtype)
        self.linear_kv_down_proj = ReplicatedLinear(h, mla.kv_lora_rank + self.rope_dim, dtype)
        self.linear_kv_up_proj = LayerNormColumnParallelLinear(mla.kv_lora_rank, heads * (self.nope + self.v_dim),
                                                               state, **norm)
        self.linear_proj = RowParallelLinear(heads * self.v_dim, h, state, bias=cfg.add_bias_linear, dtype=dtype)
        self.scale = softmax_scale(cfg)
        self.state, self.dropout = state, cfg.attention_dropout
        self.recompute = False
        self.layer_number = 0

    def _core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache=None,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        from mzoo.models.gpt import core_attention

        return core_attention(q, k, v, self.dropout if self.training else 0.0, self.state, cache, self.scale,
                              mask=mask)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]], cache=None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [s(/tp under SP), b, h], already normed by the layer's input_layernorm."""
        if self.linear_q_proj is not None:
            q = self.linear_q_proj(x)
        else:
            q = self.linear_q_up_proj(self.linear_q_down_proj(x))
        latent = self.linear_kv_down_proj(x)
        kv_latent, k_rot = latent.split([self.kv_lora, self.rope_dim], dim=-1)
        kv = self.linear_kv_up_proj(kv_latent)
        # the shared rotary key feeds every local head: full sequence, grads summed over TP
        if self.state.config.sequence_parallel:
            k_rot = C.gather_from_sp(k_rot, self.state.tp_group)
        else:
            k_rot = C.copy_to_tp(k_rot, self.state.tp_group)
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads, self.nope + self.rope_dim)
        q_pass, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        kv = kv.view(s, b, self.heads, self.nope + self.v_dim)
        k_pass, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rot = k_rot.view(s, b, 1, self.rope_dim)
        if rope is not None:
            q_rot, k_rot = apply_rotary(_deinterleave(q_rot), *rope), apply_rotary(_deinterleave(k_rot), *rope)
        q = torch.cat([q_pass, q_rot], dim=-1)
        k = torch.cat([k_pass, k_rot.expand(s, b, self.heads, self.rope_dim)], dim=-1)
        if cache is not None:  # expanded keys and values (not the latent): simple, and exact
            k, v = cache.append_kv(self.layer_number, k, v)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if self.recompute and self.training and torch.is_grad_enabled():
            out = checkpoint_with_rng(self._core_attention, q, k, v, None, mask, tracker=self.state.rng)
        else:
            out = self._core_attention(q, k, v, cache, mask)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.v_dim)
        return self.linear_proj(out)

