"""Mixtral <-> canonical: LLaMA attention, a softmax top-k router and SwiGLU experts in every layer.

On disk (what save_pretrained writes and every published checkpoint holds) the experts are
`block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down) and the router `block_sparse_moe.gate`.
transformers 5 fuses them in memory into `mlp.experts.gate_up_proj` [E, 2F, H] (gate rows first)
and `mlp.experts.down_proj` [E, H, F], with the router at `mlp.gate`; checkpoints saved without its
rename hold those, so they are accepted on read (one expert's row at a time) but never written.
"""

from __future__ import annotations

from typing import Any, Optional

from mzoo.config import ConfigError, ModelConfig, MoEConfig
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.config_map import CORE, Key, KeyTable, Reading, number, rope_from_hf
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


def _head_dim(head_dim: Optional[int], reading: Reading) -> Optional[int]:
    """None where it is hidden_size // num_attention_heads (MixtralConfig writes that default out)."""
    fields = reading.fields
    head_dim = head_dim or None
    return None if head_dim == fields["hidden_size"] // fields["num_attention_heads"] else head_dim


# MixtralConfig's defaults (theta 1e6, eps 1e-5, 4096 x 32 positions) on the shared table
KEYS = CORE.but(
    head_dim=dict(read=_head_dim),
    norm_eps=dict(default=1e-5),
    rope=dict(read=lambda v, r: rope_from_hf({"rope_theta": 1e6, **r.hf})),
    max_position_embeddings=dict(default=4096 * 32),
)
# MoEConfig fields; the expert FFN is intermediate_size (CORE's ffn_hidden_size, kept equal to it)
MOE_KEYS = KeyTable((
    Key("num_experts", "num_local_experts", 8),
    Key("top_k", "num_experts_per_tok", 2),
    Key("aux_loss_coeff", "router_aux_loss_coef", 0.001, read=number),
), MoEConfig)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    KEYS.check(hf)
    MOE_KEYS.check(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Mixtral config has hidden_act '{hf['hidden_act']}'; mzoo's mixtral family needs "
                          "'silu'.")
    positions = KEYS["max_position_embeddings"].get(hf)
    window = hf.get("sliding_window")
    if window is not None and window < positions:
        raise ConfigError(
            f"Mixtral config has sliding_window {window} below max_position_embeddings {positions}; mzoo's mixtral family has no "
            "sliding-window attention, so set sliding_window to null (or lower max_position_embeddings to it)."
        )
    fields = KEYS.read(hf)
    return ModelConfig(
        **fields,  # ffn_hidden_size: no dense layers, kept equal to the expert FFN
        family="mixtral",
        activation="swiglu",
        normalization="rmsnorm",
        position_embedding="rope",
        moe=MoEConfig(
            **MOE_KEYS.read(hf),
            ffn_hidden_size=fields["ffn_hidden_size"],
            score_function="softmax",
            norm_topk_prob=True,
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
        **KEYS.write(cfg),  # intermediate_size: ffn_hidden_size, checked equal to moe.ffn_hidden_size
        hidden_act="silu",
        sliding_window=None,
        **MOE_KEYS.write(moe),
        router_jitter_noise=0.0,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
    )


ADAPTER = register(Adapter("mixtral", "mixtral", TABLE, config_from_hf, config_to_hf))
