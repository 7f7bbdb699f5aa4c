"""LLaMA (2, 3, 3.1, 3.2) <-> canonical: config.json and the weight mapping table."""

from __future__ import annotations

from typing import Any

from mzoo.config import ConfigError, ModelConfig
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.config_map import CORE
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

KEYS = CORE  # LlamaConfig is the shared table's spelling and defaults


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"LLaMA config has hidden_act '{hf['hidden_act']}'; mzoo's llama family needs 'silu'.")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if mlp_bias and not attention_bias:
        raise ConfigError("mlp_bias without attention_bias has no Megatron equivalent; set both or neither.")
    return ModelConfig(
        **KEYS.read(hf),
        family="llama",
        activation="swiglu",
        normalization="rmsnorm",
        position_embedding="rope",
        add_bias_linear=attention_bias and mlp_bias,
        add_qkv_bias=attention_bias,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what LlamaConfig reads; tests load it with transformers itself)."""
    if cfg.add_bias_linear != cfg.add_qkv_bias:
        raise ConfigError("LLaMA in transformers ties q/k/v/o biases together; set add_qkv_bias equal to add_bias_linear.")
    return dict(
        model_type="llama",
        **KEYS.write(cfg),
        hidden_act="silu",
        attention_bias=cfg.add_qkv_bias,
        mlp_bias=cfg.add_bias_linear,
        architectures=["LlamaForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
    )


ADAPTER = register(Adapter("llama", "llama", TABLE, config_from_hf, config_to_hf))
