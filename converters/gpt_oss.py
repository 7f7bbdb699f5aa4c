"""GPT-OSS <-> canonical: biased GQA attention with sinks, alternating sliding-window / full layers,
yarn rope, a biased softmax top-k router and clamped-SwiGLU experts with biases in every layer.

transformers stores each layer's experts stacked and transposed: `mlp.experts.gate_up_proj`
[E, H, 2F] with gate and up interleaved along the last dim (gate = [..., ::2], up = [..., 1::2]),
`gate_up_proj_bias` [E, 2F] interleaved the same way, `down_proj` [E, F, H] and `down_proj_bias`
[E, H]. Megatron (Megatron-Bridge's GPT-OSS bridge) holds per expert `linear_fc1` [2F, H] as
[gate; up] and `linear_fc2` [H, F]; each canonical expert tensor is one row `[e]` of the stacked
one. Published checkpoints quantise the expert weights to MXFP4; the core HF reader presents them
dequantised under these names, so this table maps the unquantised names only and writes bf16/fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mzoo.config import ConfigError, ModelConfig, MoEConfig
from mzoo.converters import llama
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.config_map import CORE, Key, KeyTable, number, rope_from_hf
from mzoo.converters.mapping import Direct, Mapping, MappingTable

L = "decoder.layers.*."
H = "model.layers.*."
EXPERT = L + "mlp.experts.local_experts.*."
HF_EXPERTS = H + "mlp.experts."
SWIGLU_ALPHA = 1.702  # Megatron's quick_gelu gain: the only alpha mzoo's quick_geglu computes


def _interleaved(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[..., F] gate and up -> [..., 2F] with gate at even and up at odd positions."""
    return torch.stack([gate, up], dim=-1).flatten(-2)


@dataclass(frozen=True)
class InterleavedFc1(Mapping):
    """One expert's row of gate_up_proj [H, 2F] (or of its bias [2F]), gate/up interleaved along the
    last dim <-> linear_fc1 [2F, H] (or [2F]) as [gate; up]."""

    def to_canonical(self, parts, cfg):
        x = parts["x"]
        gate, up = x[..., ::2], x[..., 1::2]
        return torch.cat([gate, up], dim=-1).t().contiguous() if x.dim() == 2 else torch.cat([gate, up])

    def to_hf(self, tensor, cfg):
        gate, up = tensor.chunk(2, dim=0)
        if tensor.dim() == 2:
            gate, up = gate.t(), up.t()
        return {"x": _interleaved(gate, up).contiguous()}


@dataclass(frozen=True)
class TransposedRow(Mapping):
    """One expert's row of down_proj [F, H] <-> linear_fc2 [H, F]."""

    def to_canonical(self, parts, cfg):
        return parts["x"].t().contiguous()

    def to_hf(self, tensor, cfg):
        return {"x": tensor.t().contiguous()}


@dataclass(frozen=True)
class Row(Mapping):
    """One expert's row of a stacked tensor, unchanged (down_proj_bias): a row, never file extents."""

    def to_canonical(self, parts, cfg):
        return parts["x"]

    def to_hf(self, tensor, cfg):
        return {"x": tensor}


# LLaMA's rows (embedding, norms, output, q/k/v/o with their biases; its dense MLP rows are never asked for)
TABLE = MappingTable(llama.TABLE.mappings + [
    Direct(L + "self_attention.core_attention.softmax_offset", H + "self_attn.sinks"),
    Direct(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    Direct(L + "mlp.router.weight", H + "mlp.router.weight"),
    Direct(L + "mlp.router.bias", H + "mlp.router.bias"),
    InterleavedFc1(EXPERT + "linear_fc1.weight", {"x": HF_EXPERTS + "gate_up_proj[*]"}),
    InterleavedFc1(EXPERT + "linear_fc1.bias", {"x": HF_EXPERTS + "gate_up_proj_bias[*]"}),
    TransposedRow(EXPERT + "linear_fc2.weight", {"x": HF_EXPERTS + "down_proj[*]"}),
    Row(EXPERT + "linear_fc2.bias", {"x": HF_EXPERTS + "down_proj_bias[*]"}),
])

# GptOssConfig's defaults: yarn x32 over 4096 positions, theta 150000, no truncation of its ramp
DEFAULT_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}
KEYS = CORE.but(
    norm_eps=dict(default=1e-5),
    head_dim=dict(default=64),
    rope=dict(read=lambda v, r: rope_from_hf(r.hf if (r.hf.get("rope_parameters") or r.hf.get("rope_scaling"))
                                             else {"rope_parameters": DEFAULT_ROPE})),
    max_position_embeddings=dict(default=131072),
)
MOE_KEYS = KeyTable((
    Key("num_experts", "num_local_experts", 128),
    Key("top_k", "num_experts_per_tok", 4),
    Key("aux_loss_coeff", "router_aux_loss_coef", 0.001, read=number),
), MoEConfig)


def _window_layers(hf: dict[str, Any]) -> tuple[Any, Any]:
    """(window_size, window_attn_skip_freq) from sliding_window and layer_types: every layer windowed
    (freq None), or full attention on every Nth (1-based) layer, the patterns Megatron can say."""
    n = hf.get("num_hidden_layers", 36)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    window = hf.get("sliding_window", 128)
    if window is None or "sliding_attention" not in types:
        return None, None
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    freq = full[0] + 1 if full else None
    if freq is not None and any((t == "full_attention") != ((i + 1) % freq == 0) for i, t in enumerate(types)):
        raise ConfigError("GPT-OSS config.json has layer_types that are not full attention on every Nth layer; "
                          "mzoo (as Megatron's window_attn_skip_freq) handles only that pattern.")
    return window, freq


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    KEYS.check(hf)
    MOE_KEYS.check(hf)
    if float(hf.get("swiglu_alpha", SWIGLU_ALPHA)) != SWIGLU_ALPHA:
        raise ConfigError(f"GPT-OSS config has swiglu_alpha {hf['swiglu_alpha']}; mzoo (as Megatron's quick_gelu) "
                          f"computes {SWIGLU_ALPHA} only.")
    if not hf.get("attention_bias", True):
        raise ConfigError("GPT-OSS config has attention_bias false; mzoo's gpt_oss family has biases on every "
                          "linear (as the published models), so set attention_bias to true.")
    window, freq = _window_layers(hf)
    fields = KEYS.read(hf)
    return ModelConfig(
        **fields,  # ffn_hidden_size: no dense layers, kept equal to the expert FFN
        family="gpt_oss",
        activation="quick_geglu",
        normalization="rmsnorm",
        position_embedding="rope",
        add_bias_linear=True,
        add_qkv_bias=True,
        softmax_type="learnable",
        window_size=window,
        window_attn_skip_freq=freq,
        activation_func_clamp_value=float(hf.get("swiglu_limit", 7.0)),
        glu_linear_offset=1.0,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        moe=MoEConfig(**MOE_KEYS.read(hf), ffn_hidden_size=fields["ffn_hidden_size"], score_function="softmax",
                      norm_topk_prob=True),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what GptOssConfig reads; tests load it with transformers itself)."""
    moe = cfg.moe
    needs = {
        "a moe section": moe is not None,
        "standard attention (no mla, no qk_layernorm)": cfg.mla is None and cfg.ssm is None and not cfg.qk_layernorm,
        "quick_geglu clamped (activation_func_clamp_value) with glu_linear_offset 1": (
            cfg.activation == "quick_geglu" and cfg.activation_func_clamp_value is not None
            and cfg.glu_linear_offset == 1.0),
        "rmsnorm": cfg.normalization == "rmsnorm",
        "rope positions": cfg.position_embedding == "rope",
        "biases on every linear": cfg.add_bias_linear and cfg.add_qkv_bias,
        "attention sinks (softmax_type learnable)": cfg.softmax_type == "learnable",
    }
    if moe is not None:
        needs.update({
            "softmax top-k routing, renormalised and unscaled, without expert_bias or groups": (
                moe.score_function == "softmax" and not moe.expert_bias and moe.n_group is None
                and moe.norm_topk_prob and moe.routed_scaling_factor == 1.0),
            "experts in every layer and no shared experts": (
                moe.first_k_dense == 0 and moe.layer_freq == 1 and moe.num_shared_experts == 0),
            "ffn_hidden_size equal to moe.ffn_hidden_size": cfg.ffn_hidden_size == moe.ffn_hidden_size,
        })
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise ConfigError(f"GPT-OSS in transformers needs {', '.join(missing)}; this config differs.")
    types = ["sliding_attention" if cfg.is_window_layer(i) else "full_attention" for i in range(cfg.num_layers)]
    return dict(
        model_type="gpt_oss",
        **KEYS.write(cfg),
        **MOE_KEYS.write(moe),
        hidden_act="silu",  # unused by GptOss (its experts compute the clamped form), written as it does
        sliding_window=cfg.window_size,
        layer_types=types,
        swiglu_alpha=SWIGLU_ALPHA,
        swiglu_limit=cfg.activation_func_clamp_value,
        attention_bias=True,
        attention_dropout=cfg.attention_dropout,
        output_router_logits=False,
        architectures=["GptOssForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
    )


ADAPTER = register(Adapter("gpt_oss", "gpt_oss", TABLE, config_from_hf, config_to_hf))
