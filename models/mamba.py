"""Mamba mixers in plain torch: Mamba-1 (selective scan) and Mamba-2 (SSD, chunked scan).

Parameter names are Megatron-Core's MambaMixer names with the Transformer-Engine spelling: the
layer's pre-norm is fused into `in_proj` (`in_proj.layer_norm_weight`). Megatron has no Mamba-1
model; its mixer uses the same style with the state-spaces names (`x_proj`, `dt_proj`, `A_log`
[d_inner, d_state]). Activations are [sequence, batch, hidden] as everywhere in mzoo.

Tensor parallelism (nheads, ngroups and d_inner split over TP ranks):

- Mamba-2: `in_proj` rows [z | x | B | C | dt] are split per section, `conv1d` channels
  [x | B | C] per section, `A_log`, `D`, `dt_bias` and the gated `norm.weight` along dim 0, and
  `out_proj` is row-parallel. A rank holds whole groups of heads, so the scan and the grouped norm
  need no communication.
- Mamba-1: `in_proj` [x | z] per section, `conv1d`, `dt_proj`, `A_log`, `D` along channels;
  `x_proj` is row-parallel and its (dt, B, C) output is all-reduced, because every channel needs
  all of it.

The pure-torch scans are the reference and are exact against transformers in fp32. When the
`mamba_ssm` and `causal_conv1d` packages import, CUDA inputs use their kernels instead
(`use_kernels`), as Megatron does.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mzoo.config import ConfigError, ModelConfig
from mzoo.parallel import collectives as C
from mzoo.parallel.layers import ColumnParallelLinear, LayerNormColumnParallelLinear, RowParallelLinear
from mzoo.parallel.sharding import ShardSpec, set_spec
from mzoo.parallel.state import ParallelState


def _load_kernels() -> Optional[SimpleNamespace]:
    """The optional CUDA kernels (mamba_ssm, causal_conv1d), or None when they do not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except (ImportError, OSError, RuntimeError):
        return None
    return SimpleNamespace(conv=causal_conv1d_fn, selective_scan=selective_scan_fn,
                           chunk_scan=mamba_chunk_scan_combined)


KERNELS = _load_kernels()


@dataclass
class MambaState:
    """One Mamba layer's inference state: the last d_conv - 1 convolution inputs [b, channels, k-1]
    and the SSM state ([b, d_inner, d_state] for Mamba-1, [b, heads, head_dim, d_state] for Mamba-2)."""

    conv: torch.Tensor
    ssm: torch.Tensor


# ---- the pure-torch reference operations ------------------------------------------------------------
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  tail: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of x [b, c, s] with weight [c, 1, k]; `tail` [b, c, k-1] holds the
    inputs before x (zeros at the start of a sequence). Returns (y [b, c, s], the new tail)."""
    k = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], x.shape[1], k - 1)
    full = torch.cat([tail.to(x.dtype), x], dim=-1)
    y = F.conv1d(full, weight, bias, groups=x.shape[1])
    return y, full[..., full.shape[-1] - (k - 1):]


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, state: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's recurrence one position at a time, in fp32 (the reference the kernels reproduce).

    u, dt, z [b, d, s]; A [d, n]; B, C [b, s, n]; D [d]; state [b, d, n] or None.
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = C_t h_t + D u_t, gated by silu(z_t)."""
    u, dt, B, C = u.float(), dt.float(), B.float(), C.float()
    h = state.float() if state is not None else u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        step = dt[:, :, t, None]
        h = torch.exp(step * A) * h + step * B[:, None, t] * u[:, :, t, None]
        ys.append(torch.matmul(h, C[:, t, :, None]).squeeze(-1))
    y = torch.stack(ys, dim=-1) + u * D.float()[:, None]
    return y * F.silu(z.float()), h


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """x [..., T] -> [..., T, T] with out[i, j] = x[j+1] + ... + x[i] for i >= j and -inf above the
    diagonal; built by masked cumulative sums, which stay finite where exp(-inf) must be 0."""
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return x.masked_fill(~lower, float("-inf"))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, D: torch.Tensor, state: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's scan as state-space duality over chunks (Dao & Gu 2024, `ssd_minimal`), in fp32.

    x [b, s, h, p]; dt [b, s, h] after softplus; A [h]; B, C [b, s, g, n]; D [h]; state
    [b, h, p, n] or None. Returns (y [b, s, h, p], final state). Padding to whole chunks uses
    dt = 0 (no decay, no input), so any chunk size gives the same result."""
    b, s, h, p = x.shape
    rep = h // B.shape[2]
    x, dt = x.float(), dt.float()
    B = B.float().repeat_interleave(rep, dim=2)
    C = C.float().repeat_interleave(rep, dim=2)
    pad = (-s) % chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [b, s, ...] -> [b, chunks, chunk_size, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, -1, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])  # [b, c, l, h, p]
    a = chunks(dt * A.float())  # [b, c, l, h]: log-decay per position
    Bc, Cc = chunks(B), chunks(C)  # [b, c, l, h, n]
    a_cum = a.cumsum(dim=2)
    # 1. inside each chunk: C_i B_j decayed from j to i, a causal "attention" over positions
    decay = torch.exp(_segsum(a.transpose(2, 3)))  # [b, c, h, l, l]
    scores = torch.einsum("bclhn,bcshn->bchls", Cc, Bc) * decay
    y = torch.einsum("bchls,bcshp->bclhp", scores, xdt)
    # 2. the state each chunk leaves behind from its own inputs
    to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # [b, c, l, h]
    states = torch.einsum("bclhn,bclh,bclhp->bchpn", Bc, to_end, xdt)
    # 3. carry states from chunk to chunk (the initial state enters as chunk -1)
    start = state.float()[:, None] if state is not None else torch.zeros_like(states[:, :1])
    states = torch.cat([start, states], dim=1)  # [b, c+1, h, p, n]
    carry = torch.exp(_segsum(F.pad(a_cum[:, :, -1], (0, 0, 1, 0)).transpose(1, 2)))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", carry, states)
    states, final = states[:, :-1], states[:, -1]
    # 4. what each chunk's starting state contributes to its outputs
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", Cc, states, torch.exp(a_cum))
    y = y.reshape(b, -1, h, p)[:, :s] + x * D.float()[:, None]
    return y, final


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int,
                   eps: float) -> torch.Tensor:
    """Mamba-2's norm (norm_before_gate=False): y * silu(z), RMS-normalised within each of `groups`
    equal groups of channels, times weight; in fp32."""
    y = y.float() * F.silu(z.float())
    shape = y.shape
    y = y.view(*shape[:-1], groups, -1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * y.view(shape)


# ---- parameters -------------------------------------------------------------------------------------
def _tp_param(shape: Sequence[int], tp: int, dtype,
              sections: Optional[tuple[int, ...]] = None) -> nn.Parameter:
    """A parameter split along dim 0 over TP (per section when given); `shape` is global."""
    local = (shape[0] // tp, *shape[1:])
    return set_spec(nn.Parameter(torch.empty(*local, dtype=dtype)), ShardSpec("tp", 0, sections))


class CausalConv1d(nn.Module):
    """Depthwise causal convolution `conv1d.weight` [channels, 1, k] (+ `conv1d.bias`), channels split
    over TP per section."""

    def __init__(self, channels: int, kernel: int, state: ParallelState, bias: bool,
                 sections: Optional[tuple[int, ...]] = None, dtype=None):
        super().__init__()
        self.weight = _tp_param((channels, 1, kernel), state.tp, dtype, sections)
        self.bias = _tp_param((channels,), state.tp, dtype, sections) if bias else None


class GatedRMSNorm(nn.Module):
    """`norm.weight` [d_inner], split over TP with the groups it normalises."""

    def __init__(self, size: int, groups: int, eps: float, state: ParallelState, dtype=None):
        super().__init__()
        self.weight = _tp_param((size,), state.tp, dtype)
        self.groups, self.eps = groups // state.tp, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.groups, self.eps)


def _state_of(cache, layer: int) -> Optional[MambaState]:
    return cache.layers.get(layer) if cache is not None else None


# ---- the mixers -------------------------------------------------------------------------------------
class Mamba2Mixer(nn.Module):
    """Megatron-Core's MambaMixer: in_proj -> causal conv over [x | B | C] -> SSD scan -> gated
    RMSNorm with z -> out_proj. x [s, b, h] (sequence-sharded under SP) -> [s, b, h]."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype=None):
        super().__init__()
        ssm, tp, dims = cfg.ssm, state.tp, cfg.mamba_dims()
        d_inner, heads, groups, n = dims["d_inner"], dims["nheads"], ssm.num_groups, ssm.d_state
        if heads % tp or groups % tp:
            raise ConfigError(f"tensor parallel size {tp} must divide the Mamba-2 heads ({heads}) and groups "
                              f"({groups}); choose a TP that divides both.")
        self.d_inner, self.heads, self.groups = d_inner // tp, heads // tp, groups // tp
        self.head_dim, self.d_state, self.chunk_size = ssm.head_dim, n, ssm.chunk_size
        self.in_proj = LayerNormColumnParallelLinear(
            cfg.hidden_size, dims["in_proj"], state, cfg.normalization, cfg.norm_eps, bias=ssm.proj_bias,
            sections=(d_inner, d_inner, groups * n, groups * n, heads), dtype=dtype)
        self.conv1d = CausalConv1d(dims["conv_dim"], ssm.d_conv, state, ssm.conv_bias,
                                   (d_inner, groups * n, groups * n), dtype)
        self.A_log = _tp_param((heads,), tp, dtype)
        self.D = _tp_param((heads,), tp, dtype)
        self.dt_bias = _tp_param((heads,), tp, dtype)
        self.norm = GatedRMSNorm(d_inner, groups, cfg.norm_eps, state, dtype)
        self.out_proj = RowParallelLinear(d_inner, cfg.hidden_size, state, bias=ssm.proj_bias, dtype=dtype)
        self.layer_number = 0  # global index, set by the layer: key of the inference cache
        self.use_kernels = KERNELS is not None

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        zxbcdt = self.in_proj(x).transpose(0, 1)  # [b, s, rows]: the whole sequence under SP
        b, s, _ = zxbcdt.shape
        gn = self.groups * self.d_state
        z, xbc, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * gn, self.heads], dim=-1)
        A = -torch.exp(self.A_log.float())
        if self.use_kernels and zxbcdt.is_cuda and cache is None:
            y = self._kernel_scan(xbc, dt, A)
        else:
            prev = _state_of(cache, self.layer_number)
            xbc, tail = causal_conv1d(xbc.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                      prev.conv if prev else None)
            xs, B, Cm = F.silu(xbc).transpose(1, 2).split([self.d_inner, gn, gn], dim=-1)
            dt = F.softplus(dt.float() + self.dt_bias.float())
            groups = (b, s, self.groups, self.d_state)
            y, last = ssd_scan(xs.reshape(b, s, self.heads, self.head_dim), dt, A, B.reshape(groups),
                               Cm.reshape(groups), min(self.chunk_size, s), self.D,
                               prev.ssm if prev else None)
            if cache is not None:
                cache.layers[self.layer_number] = MambaState(tail, last)
        y = self.norm(y.reshape(b, s, self.d_inner), z).to(x.dtype)
        return self.out_proj(y.transpose(0, 1))

    def _kernel_scan(self, xbc: torch.Tensor, dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """The same computation with causal_conv1d and mamba_ssm's chunked scan (CUDA)."""
        b, s, _ = xbc.shape
        gn = self.groups * self.d_state
        xbc = KERNELS.conv(xbc.transpose(1, 2).contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                           activation="silu")
        xs, B, Cm = (t.contiguous() for t in xbc.transpose(1, 2).split([self.d_inner, gn, gn], dim=-1))
        groups = (b, s, self.groups, self.d_state)
        return KERNELS.chunk_scan(
            xs.view(b, s, self.heads, self.head_dim), dt.contiguous(), A, B.view(groups), Cm.view(groups),
            self.chunk_size, D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True)


class Mamba1Mixer(nn.Module):
    """The state-spaces Mamba block: in_proj [x | z] -> causal conv -> x_proj (dt, B, C) -> dt_proj
    -> selective scan gated by z -> out_proj. x [s, b, h] -> [s, b, h]."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype=None):
        super().__init__()
        ssm, tp, dims = cfg.ssm, state.tp, cfg.mamba_dims()
        d_inner, self.dt_rank, self.d_state = dims["d_inner"], dims["dt_rank"], ssm.d_state
        if d_inner % tp:
            raise ConfigError(f"tensor parallel size {tp} does not divide the Mamba inner size {d_inner}; "
                              "choose a TP that divides it.")
        self.d_inner, self.state = d_inner // tp, state
        self.in_proj = LayerNormColumnParallelLinear(
            cfg.hidden_size, 2 * d_inner, state, cfg.normalization, cfg.norm_eps, bias=ssm.proj_bias,
            sections=(d_inner, d_inner), dtype=dtype)
        self.conv1d = CausalConv1d(d_inner, ssm.d_conv, state, ssm.conv_bias, dtype=dtype)
        # used as plain weights: the mixer does their communication itself (the sequence is whole here)
        self.x_proj = RowParallelLinear(d_inner, self.dt_rank + 2 * ssm.d_state, state, dtype=dtype)
        self.dt_proj = ColumnParallelLinear(self.dt_rank, d_inner, state, bias=True, dtype=dtype)
        self.A_log = _tp_param((d_inner, ssm.d_state), tp, dtype)
        self.D = _tp_param((d_inner,), tp, dtype)
        self.out_proj = RowParallelLinear(d_inner, cfg.hidden_size, state, bias=ssm.proj_bias, dtype=dtype)
        self.layer_number = 0
        self.use_kernels = KERNELS is not None

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        u, z = self.in_proj(x).permute(1, 2, 0).chunk(2, dim=1)  # [b, d, s] each
        prev = _state_of(cache, self.layer_number)
        kernels = self.use_kernels and u.is_cuda and cache is None
        if kernels:
            u = KERNELS.conv(u.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                             activation="silu")
        else:
            u, tail = causal_conv1d(u, self.conv1d.weight, self.conv1d.bias, prev.conv if prev else None)
            u = F.silu(u)
        # (dt, B, C) from this rank's channels: partial sums, all-reduced; each rank then uses all of it
        group = self.state.tp_group
        x_dbl = C.copy_to_tp(C.reduce_from_tp(F.linear(u.transpose(1, 2), self.x_proj.weight), group), group)
        dt, B, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # [b, d, s]; its bias goes in with softplus
        A = -torch.exp(self.A_log.float())
        if kernels:
            y = KERNELS.selective_scan(u, dt.contiguous(), A, B.transpose(1, 2).contiguous(),
                                       Cm.transpose(1, 2).contiguous(), self.D.float(), z=z.contiguous(),
                                       delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        else:
            dt = F.softplus(dt.float() + self.dt_proj.bias.float()[:, None])
            y, last = selective_scan(u, dt, A, B, Cm, self.D, z, prev.ssm if prev else None)
            if cache is not None:
                cache.layers[self.layer_number] = MambaState(tail, last)
        return self.out_proj(y.permute(2, 0, 1).to(x.dtype))


def build_mixer(cfg: ModelConfig, state: ParallelState, dtype=None) -> nn.Module:
    return (Mamba1Mixer if cfg.ssm.version == 1 else Mamba2Mixer)(cfg, state, dtype)


# ---- initialisation ---------------------------------------------------------------------------------
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # Megatron's and state-spaces' defaults


def init_mamba_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...],
                      seed: int) -> Optional[torch.Tensor]:
    """Initial value of a canonical mixer tensor that is not a plain weight, as Megatron's MambaMixer
    (Mamba-2) and state-spaces' Mamba (Mamba-1) set it; None for everything else (linear weights,
    norms, biases: models.gpt.init_tensor applies). Seeded by name like init_tensor."""
    if ".mixer." not in name:
        return None
    leaf = name.split(".mixer.", 1)[1]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if leaf == "A_log":  # A = -exp(A_log): S4D-real 1..N per channel (Mamba-1), U(1, 16) per head (Mamba-2)
        if cfg.ssm.version == 1:
            return torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).expand(shape).clone()
        return torch.log(torch.empty(shape).uniform_(1.0, 16.0, generator=gen))
    if leaf == "D":
        return torch.ones(shape)
    if leaf in ("dt_bias", "dt_proj.bias"):  # softplus(bias) log-uniform in [DT_MIN, DT_MAX]
        u = torch.rand(shape, generator=gen)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        return dt + torch.log(-torch.expm1(-dt))
    if leaf == "dt_proj.weight":
        bound = shape[1] ** -0.5
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    if leaf in ("conv1d.weight", "conv1d.bias"):  # torch's Conv1d default: U(+-1/sqrt(fan_in)), fan_in = k
        bound = 1.0 / math.sqrt(cfg.ssm.d_conv)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    return None
