"""Mixtral <-> canonical: LLaMA attention, a softmax top-k router and SwiGLU experts in every layer.

On disk (what save_pretrained writes and every published checkpoint holds) the experts are
`block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down) and the router `block_sparse_moe.gate`.
transformers 5 fuses them in memory into `mlp.experts.gate_up_proj` [E, 2F, H] (gate rows first)
and `mlp.experts.down_proj` [E, H, F], with the router at `mlp.gate`; checkpoints saved without its
rename hold those, so they are accepted on read (one expert's row at a time) but never written.
"""

from __future__ import annotations

from typing import Any

from mzoo.config import ConfigError, ModelConfig, MoEConfig
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.llama import rope_from_hf, rope_to_hf
from mzoo.converters.mapping import QKV, Direct, GatedMLP, MappingTable

L = "decoder.layers.*."
H = "model.layers.*."
EXPERT = L + "mlp.experts.local_experts.*."
HF_EXPERT = H + "block_sparse_moe.experts.*."

TABLE = MappingTable([
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    Direct("output_layer.weight", "lm_head.weight"),
    Direct(L + "self_attention.linear_qkv.layer_norm_weight", H + "input_layernorm.weight"),
    QKV(L + "self_attention.linear_qkv.weight",
        {"q": H + "self_attn.q_proj.weight", "k": H + "self_attn.k_proj.weight", "v": H + "self_attn.v_proj.weight"}),
    Direct(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
    Direct(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    Direct(L + "mlp.router.weight", H + "block_sparse_moe.gate.weight"),
    Direct(L + "mlp.router.weight", H + "mlp.gate.weight"),  # fused spelling, read only
    GatedMLP(EXPERT + "linear_fc1.weight", {"gate": HF_EXPERT + "w1.weight", "up": HF_EXPERT + "w3.weight"}),
    Direct(EXPERT + "linear_fc1.weight", H + "mlp.experts.gate_up_proj[*]"),  # row e = [gate; up]
    Direct(EXPERT + "linear_fc2.weight", HF_EXPERT + "w2.weight"),
    Direct(EXPERT + "linear_fc2.weight", H + "mlp.experts.down_proj[*]"),
])


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Mixtral config has hidden_act '{hf['hidden_act']}'; mzoo's mixtral family needs "
                          "'silu'.")
    positions = hf.get("max_position_embeddings", 4096 * 32)
    window = hf.get("sliding_window")
    if window is not None and window < positions:
        raise ConfigError(
            f"Mixtral config has sliding_window {window} below max_position_embeddings {positions}; mzoo has no "
            "sliding-window attention, so set sliding_window to null (or lower max_position_embeddings to it)."
        )
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    ffn = hf["intermediate_size"]
    head_dim = hf.get("head_dim") or None
    return ModelConfig(
        name=hf.get("_name_or_path", "") or "",
        family="mixtral",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim == hidden // heads else head_dim,
        ffn_hidden_size=ffn,  # no dense layers: kept equal to the expert FFN
        activation="swiglu",
        normalization="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        position_embedding="rope",
        rope=rope_from_hf({"rope_theta": 1e6, **hf}),  # Mixtral's default theta
        max_position_embeddings=positions,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=MoEConfig(
            num_experts=hf.get("num_local_experts", 8),
            top_k=hf.get("num_experts_per_tok", 2),
            ffn_hidden_size=ffn,
            score_function="softmax",
            norm_topk_prob=True,
            aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
        ),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what MixtralConfig reads; tests load it with transformers itself)."""
    moe = cfg.moe
    needs = {
        "a moe section": moe is not None,
        "standard attention (no mla)": cfg.mla is None and cfg.ssm is None,
        "swiglu": cfg.activation == "swiglu",
        "rmsnorm": cfg.normalization == "rmsnorm",
        "rope positions": cfg.position_embedding == "rope",
        "no biases": not (cfg.add_bias_linear or cfg.add_qkv_bias),
        "no qk_layernorm": not cfg.qk_layernorm,
    }
    if moe is not None:
        needs.update({
            "softmax routing without expert_bias or groups": (
                moe.score_function == "softmax" and not moe.expert_bias and moe.n_group is None
            ),
            "renormalised top-k weights (norm_topk_prob) unscaled (routed_scaling_factor 1)": (
                moe.norm_topk_prob and moe.routed_scaling_factor == 1.0
            ),
            "experts in every layer (first_k_dense 0, layer_freq 1)": (
                moe.first_k_dense == 0 and moe.layer_freq == 1
            ),
            "no shared experts": moe.num_shared_experts == 0,
            "ffn_hidden_size equal to moe.ffn_hidden_size": cfg.ffn_hidden_size == moe.ffn_hidden_size,
        })
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise ConfigError(f"Mixtral in transformers needs {', '.join(missing)}; this config differs.")
    return dict(
        model_type="mixtral",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=moe.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.groups,
        head_dim=cfg.kv_channels,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope_to_hf(cfg.rope),
        sliding_window=None,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coeff,
        router_jitter_noise=0.0,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
    )


ADAPTER = register(Adapter("mixtral", "mixtral", TABLE, config_from_hf, config_to_hf))
