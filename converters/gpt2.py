"""GPT-2 <-> canonical: Conv1D transposes, the fused [q; k; v] c_attn, learned positions, tied head."""

from __future__ import annotations

from typing import Any, Optional

from mzoo.config import ConfigError, ModelConfig
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.config_map import CORE, REQUIRED, Reading
from mzoo.converters.mapping import Direct, FusedQKV, MappingTable, Transposed

L = "decoder.layers.*."
H = "transformer.h.*."

TABLE = MappingTable([
    Direct("embedding.word_embeddings.weight", "transformer.wte.weight"),
    Direct("embedding.position_embeddings.weight", "transformer.wpe.weight"),
    Direct("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
    Direct("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
    Direct("output_layer.weight", "lm_head.weight"),
    Direct(L + "self_attention.linear_qkv.layer_norm_weight", H + "ln_1.weight"),
    Direct(L + "self_attention.linear_qkv.layer_norm_bias", H + "ln_1.bias"),
    FusedQKV(L + "self_attention.linear_qkv.weight", {"x": H + "attn.c_attn.weight"}, transposed=True),
    FusedQKV(L + "self_attention.linear_qkv.bias", {"x": H + "attn.c_attn.bias"}),
    Transposed(L + "self_attention.linear_proj.weight", {"x": H + "attn.c_proj.weight"}),
    Direct(L + "self_attention.linear_proj.bias", H + "attn.c_proj.bias"),
    Direct(L + "mlp.linear_fc1.layer_norm_weight", H + "ln_2.weight"),
    Direct(L + "mlp.linear_fc1.layer_norm_bias", H + "ln_2.bias"),
    Transposed(L + "mlp.linear_fc1.weight", {"x": H + "mlp.c_fc.weight"}),
    Direct(L + "mlp.linear_fc1.bias", H + "mlp.c_fc.bias"),
    Transposed(L + "mlp.linear_fc2.weight", {"x": H + "mlp.c_proj.weight"}),
    Direct(L + "mlp.linear_fc2.bias", H + "mlp.c_proj.bias"),
])

HF_TO_MZOO_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
MZOO_TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _ffn(n_inner: Optional[int], reading: Reading) -> int:
    """n_inner null or absent: transformers' 4 x n_embd."""
    return n_inner or 4 * reading.fields["hidden_size"]


def _n_inner(cfg: ModelConfig) -> Optional[int]:
    return None if cfg.ffn_hidden_size == 4 * cfg.hidden_size else cfg.ffn_hidden_size


# GPT2Config's spelling and defaults; no GQA, head_dim or rope
KEYS = CORE.but(
    "num_query_groups", "head_dim", "rope",
    hidden_size=dict(hf="n_embd"),
    num_layers=dict(hf="n_layer"),
    num_attention_heads=dict(hf="n_head"),
    ffn_hidden_size=dict(hf="n_inner", default=None, read=_ffn, write=_n_inner),
    norm_eps=dict(hf="layer_norm_epsilon", default=1e-5),
    max_position_embeddings=dict(hf="n_positions", default=REQUIRED),
    tie_embeddings=dict(default=True),
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_TO_MZOO_ACTIVATION:
        raise ConfigError(f"GPT-2 activation_function '{act}' is not supported; use one of "
                          f"{', '.join(HF_TO_MZOO_ACTIVATION)}.")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise ConfigError(f"GPT-2 configs with {flag}=true have no Megatron equivalent; mzoo cannot convert them.")
    if hf.get("scale_attn_weights") is False:
        raise ConfigError("GPT-2 configs with scale_attn_weights=false have no Megatron equivalent.")
    return ModelConfig(
        **KEYS.read(hf),
        family="gpt",
        activation=HF_TO_MZOO_ACTIVATION[act],
        normalization="layernorm",
        position_embedding="learned",
        add_bias_linear=True,
        add_qkv_bias=True,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what GPT2Config reads; tests load it with transformers itself)."""
    problems = {
        "layernorm normalization": cfg.normalization == "layernorm",
        "learned positions": cfg.position_embedding == "learned",
        "biases on every linear": cfg.add_bias_linear and cfg.add_qkv_bias,
        "multi-head attention": cfg.groups == cfg.num_attention_heads,
        "head_dim = hidden / heads": cfg.kv_channels * cfg.num_attention_heads == cfg.hidden_size,
        "a non-gated activation": cfg.activation in ("gelu", "gelu_tanh", "relu"),
    }
    missing = [k for k, ok in problems.items() if not ok]
    if missing:
        raise ConfigError(f"GPT-2 in transformers needs {', '.join(missing)}; this config differs.")
    return dict(
        model_type="gpt2",
        **KEYS.write(cfg),
        activation_function=MZOO_TO_HF_ACTIVATION[cfg.activation],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        architectures=["GPT2LMHeadModel"],
        bos_token_id=None,
        eos_token_id=None,
    )


ADAPTER = register(Adapter("gpt", "gpt2", TABLE, config_from_hf, config_to_hf))
