"""Rotary position embeddings: default, linear, llama3 and yarn frequency schedules.

The inverse frequencies are computed exactly as transformers computes them (same dtype steps), so
logits match the reference models to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mzoo.config import ModelConfig, RopeConfig


def inverse_frequencies(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_factor) for a rotary dimension `dim`; always computed on the
    CPU (inside a meta-device build, meta kernels would pull in torch's compiler stack: ~2 s)."""
    with torch.device("cpu"):
        return _inverse_frequencies(rope, dim, max_positions)


def _inverse_frequencies(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.scaling is None:
        return inv_freq, 1.0
    if rope.scaling == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.scaling == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.scaling == "yarn":
        return _yarn(rope, dim, max_positions)
    raise ValueError(f"unknown rope scaling '{rope.scaling}'")


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    original = rope.original_max_position_embeddings
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; rotate-half convention (HF and Megatron agree on it)."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.dim = int(dim * cfg.rope.rotary_percent)
        inv_freq, self.attention_factor = inverse_frequencies(cfg.rope, self.dim, cfg.max_position_embeddings)
        # computed on the CPU (the same values everywhere), kept where the model is built (its GPU)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] -> cos, sin [s, b, 1, dim] in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq.float().to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1).transpose(0, 1).unsqueeze(2)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [s, b, heads, d]; the rest pass through."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    out = (rot * cos.to(x.dtype)) + (_rotate_half(rot) * sin.to(x.dtype))
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
