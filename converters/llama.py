"""LLaMA (2, 3, 3.1, 3.2) <-> canonical: config.json and the weight mapping table."""

from __future__ import annotations

from typing import Any

from mzoo.config import ConfigError, ModelConfig, RopeConfig
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.mapping import QKV, Direct, GatedMLP, MappingTable

L = "decoder.layers.*."
H = "model.layers.*."

TABLE = MappingTable([
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    Direct("output_layer.weight", "lm_head.weight"),
    Direct(L + "self_attention.linear_qkv.layer_norm_weight", H + "input_layernorm.weight"),
    QKV(L + "self_attention.linear_qkv.weight",
        {"q": H + "self_attn.q_proj.weight", "k": H + "self_attn.k_proj.weight", "v": H + "self_attn.v_proj.weight"}),
    QKV(L + "self_attention.linear_qkv.bias",
        {"q": H + "self_attn.q_proj.bias", "k": H + "self_attn.k_proj.bias", "v": H + "self_attn.v_proj.bias"}),
    Direct(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
    Direct(L + "self_attention.linear_proj.bias", H + "self_attn.o_proj.bias"),
    Direct(L + "mlp.linear_fc1.layer_norm_weight", H + "post_attention_layernorm.weight"),
    GatedMLP(L + "mlp.linear_fc1.weight", {"gate": H + "mlp.gate_proj.weight", "up": H + "mlp.up_proj.weight"}),
    GatedMLP(L + "mlp.linear_fc1.bias", {"gate": H + "mlp.gate_proj.bias", "up": H + "mlp.up_proj.bias"}),
    Direct(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
    Direct(L + "mlp.linear_fc2.bias", H + "mlp.down_proj.bias"),
])


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """transformers 5 `rope_parameters`, or the older top-level rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise ConfigError(f"rope type '{kind}' in config.json is not supported; mzoo handles default, linear, llama3, yarn.")
    rope = RopeConfig(theta=float(theta), scaling=None if kind == "default" else kind)
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if params.get(key) is not None:
            setattr(rope, key, float(params[key]))
    if params.get("original_max_position_embeddings"):
        rope.original_max_position_embeddings = int(params["original_max_position_embeddings"])
    rope.rotary_percent = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    return rope


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.scaling or "default"}
    if rope.scaling in ("linear", "llama3", "yarn"):
        out["factor"] = rope.factor
    if rope.scaling == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.scaling == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if rope.mscale is not None:
            out.update(mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim)
    if rope.scaling in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.rotary_percent != 1.0:
        out["partial_rotary_factor"] = rope.rotary_percent
    return out


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"LLaMA config has hidden_act '{hf['hidden_act']}'; mzoo's llama family needs 'silu'.")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if mlp_bias and not attention_bias:
        raise ConfigError("mlp_bias without attention_bias has no Megatron equivalent; set both or neither.")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        name=hf.get("_name_or_path", "") or "",
        family="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or None,
        ffn_hidden_size=hf["intermediate_size"],
        activation="swiglu",
        normalization="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        position_embedding="rope",
        rope=rope_from_hf(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_bias_linear=attention_bias and mlp_bias,
        add_qkv_bias=attention_bias,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what LlamaConfig reads; tests load it with transformers itself)."""
    if cfg.add_bias_linear != cfg.add_qkv_bias:
        raise ConfigError("LLaMA in transformers ties q/k/v/o biases together; set add_qkv_bias equal to add_bias_linear.")
    return dict(
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.groups,
        head_dim=cfg.kv_channels,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope_to_hf(cfg.rope),
        attention_bias=cfg.add_qkv_bias,
        mlp_bias=cfg.add_bias_linear,
        architectures=["LlamaForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
    )


ADAPTER = register(Adapter("llama", "llama", TABLE, config_from_hf, config_to_hf))
