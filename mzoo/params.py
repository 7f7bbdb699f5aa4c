"""Exact parameter counts from a ModelConfig, without building a model.

Counts follow Megatron-Core's module layout on the true (unpadded) vocabulary, with tied
embeddings counted once. Tests check them against the numel of models built on the meta device,
and the zoo checks them against published totals.
"""

from __future__ import annotations

from dataclasses import dataclass

from mzoo.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # parameters touched per token (differs from total only with MoE)


def _norm(cfg: ModelConfig, size: int) -> int:
    return size * (2 if cfg.normalization == "layernorm" else 1)


def attention_params(cfg: ModelConfig) -> int:
    """One attention block including its input norm."""
    h = cfg.hidden_size
    bias = cfg.add_bias_linear
    if cfg.mla is not None:
        m, n = cfg.mla, cfg.num_attention_heads
        qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            q = h * m.q_lora_rank + _norm(cfg, m.q_lora_rank) + m.q_lora_rank * n * qk_head
        else:
            q = h * n * qk_head
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + _norm(cfg, m.kv_lora_rank)
        kv += m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
        out = n * m.v_head_dim * h + (h if bias else 0)
        return _norm(cfg, h) + q + kv + out
    d = cfg.kv_channels
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.groups) * d
    qkv = h * qkv_rows + (qkv_rows if cfg.add_qkv_bias or bias else 0)
    out = cfg.num_attention_heads * d * h + (h if bias else 0)
    qk_norm = 2 * _norm(cfg, d) if cfg.qk_layernorm else 0
    return _norm(cfg, h) + qkv + out + qk_norm


def mlp_params(cfg: ModelConfig, ffn: int, with_norm: bool = True) -> int:
    """One (gated) MLP: fc1 + fc2 (+ the pre-MLP norm)."""
    h = cfg.hidden_size
    width = ffn * (2 if cfg.gated else 1)
    n = h * width + ffn * h
    if cfg.add_bias_linear:
        n += width + h
    return n + (_norm(cfg, h) if with_norm else 0)


def moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) of one MoE block including its pre-MLP norm, router and shared experts."""
    moe = cfg.moe
    h = cfg.hidden_size
    expert = mlp_params(cfg, moe.ffn_hidden_size, with_norm=False)
    shared_ffn = (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size) * moe.num_shared_experts
    shared = mlp_params(cfg, shared_ffn, with_norm=False) if shared_ffn else 0
    router = moe.num_experts * h + (moe.num_experts if moe.expert_bias else 0)
    fixed = _norm(cfg, h) + router + shared
    return fixed + moe.num_experts * expert, fixed + moe.top_k * expert


def mamba_params(cfg: ModelConfig) -> int:
    """One Mamba layer: its pre-norm and the mixer."""
    ssm, h = cfg.ssm, cfg.hidden_size
    d = cfg.mamba_dims()
    d_inner, conv_dim = d["d_inner"], d["conv_dim"]
    conv = conv_dim * ssm.d_conv + (conv_dim if ssm.conv_bias else 0)
    in_proj = h * d["in_proj"] + (d["in_proj"] if ssm.proj_bias else 0)
    out_proj = d_inner * h + (h if ssm.proj_bias else 0)
    if ssm.version == 1:
        r = d["dt_rank"]
        x_proj = d_inner * (r + 2 * ssm.d_state)
        dt_proj = r * d_inner + d_inner
        a_d = d_inner * ssm.d_state + d_inner
        mixer = in_proj + conv + x_proj + dt_proj + a_d + out_proj
    else:
        heads = 3 * d["nheads"]  # A_log, D, dt_bias
        mixer = in_proj + conv + heads + d_inner + out_proj  # + gated RMSNorm weight
    return _norm(cfg, h) + mixer


def count_params(cfg: ModelConfig) -> ParamCount:
    h = cfg.hidden_size
    total = active = cfg.vocab_size * h  # word embeddings
    if cfg.position_embedding == "learned":
        total += cfg.max_position_embeddings * h
        active += cfg.max_position_embeddings * h
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * h
        active += cfg.vocab_size * h
    total += _norm(cfg, h)
    active += _norm(cfg, h)
    for index, kind in enumerate(cfg.layer_types):
        if kind == "mamba":
            t = a = mamba_params(cfg)
        elif kind == "attention":
            t = a = attention_params(cfg)
        elif kind == "mlp":
            t = a = mlp_params(cfg, cfg.ffn_hidden_size)
        elif kind == "moe":
            t, a = moe_params(cfg)
        else:  # transformer layer: attention + dense MLP or MoE
            t = a = attention_params(cfg)
            if cfg.is_moe_layer(index):
                mt, ma = moe_params(cfg)
            else:
                mt = ma = mlp_params(cfg, cfg.ffn_hidden_size)
            t, a = t + mt, a + ma
        total += t
        active += a
    return ParamCount(total=total, active=active)


def human(n: int) -> str:
    """8030261248 -> '8.03B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if n / scale < 10 else f"{n / scale:.1f}{unit}"
    return str(n)
