"""DeepSeek-V2 / V2-Lite / V3 <-> canonical: multi-latent attention, dense leading layers, routed +
shared experts.

Both HF model types share one mzoo family and one table; which one a config is written as follows
from its routing: sigmoid scores with an expert bias (aux-loss-free) is DeepSeek-V3, softmax is
DeepSeek-V2. transformers implements each with fixed behaviour (V2 always softmax and never
renormalises top-k weights; V3 always sigmoid + e_score_correction_bias, group-limited, interleaved
rope; neither honours moe_layer_freq), so configs outside that fail with one sentence rather than
convert into a different network. The MTP layers of published checkpoints
(`model.layers.{num_hidden_layers}.*`) are never asked for, so they are ignored on read.
"""

from __future__ import annotations

from typing import Any

from mzoo.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, check_types
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.config_map import CORE, MOE, Key, KeyTable, number
from mzoo.converters.mapping import Direct, GatedMLP, MappingTable

L = "decoder.layers.*."
H = "model.layers.*."
A = L + "self_attention."
HA = H + "self_attn."
EXPERT = L + "mlp.experts.local_experts.*."
HF_EXPERT = H + "mlp.experts.*."

TABLE = MappingTable([
    Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
    Direct("output_layer.weight", "lm_head.weight"),
    # multi-latent attention (weights copied unchanged, same row order)
    Direct(L + "input_layernorm.weight", H + "input_layernorm.weight"),
    Direct(A + "linear_q_down_proj.weight", HA + "q_a_proj.weight"),
    Direct(A + "linear_q_up_proj.layer_norm_weight", HA + "q_a_layernorm.weight"),
    Direct(A + "linear_q_up_proj.weight", HA + "q_b_proj.weight"),
    Direct(A + "linear_q_proj.weight", HA + "q_proj.weight"),
    Direct(A + "linear_kv_down_proj.weight", HA + "kv_a_proj_with_mqa.weight"),
    Direct(A + "linear_kv_up_proj.layer_norm_weight", HA + "kv_a_layernorm.weight"),
    Direct(A + "linear_kv_up_proj.weight", HA + "kv_b_proj.weight"),
    Direct(A + "linear_proj.weight", HA + "o_proj.weight"),
    # dense layers (N < first_k_dense): the norm is fused into linear_fc1
    Direct(L + "mlp.linear_fc1.layer_norm_weight", H + "post_attention_layernorm.weight"),
    GatedMLP(L + "mlp.linear_fc1.weight", {"gate": H + "mlp.gate_proj.weight", "up": H + "mlp.up_proj.weight"}),
    Direct(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
    # MoE layers: the same HF norm is a separate pre_mlp_layernorm
    Direct(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    Direct(L + "mlp.router.weight", H + "mlp.gate.weight"),
    Direct(L + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias"),
    GatedMLP(EXPERT + "linear_fc1.weight",
             {"gate": HF_EXPERT + "gate_proj.weight", "up": HF_EXPERT + "up_proj.weight"}),
    Direct(EXPERT + "linear_fc1.weight", H + "mlp.experts.gate_up_proj[*]"),  # fused spelling, read only
    Direct(EXPERT + "linear_fc2.weight", HF_EXPERT + "down_proj.weight"),
    Direct(EXPERT + "linear_fc2.weight", H + "mlp.experts.down_proj[*]"),  # fused spelling, read only
    GatedMLP(L + "mlp.shared_experts.linear_fc1.weight", {"gate": H + "mlp.shared_experts.gate_proj.weight",
                                                          "up": H + "mlp.shared_experts.up_proj.weight"}),
    Direct(L + "mlp.shared_experts.linear_fc2.weight", H + "mlp.shared_experts.down_proj.weight"),
])

# transformers' defaults for keys a config.json may leave out (DeepseekV2Config / DeepseekV3Config)
DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(first_k_dense_replace=0, q_lora_rank=1536, n_group=None, topk_group=None,
                        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                        routed_scaling_factor=1.0, max_position_embeddings=2048),
    "deepseek_v3": dict(first_k_dense_replace=3, q_lora_rank=1536, n_group=8, topk_group=4,
                        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                        routed_scaling_factor=2.5, max_position_embeddings=4096),
}
V2_METHODS = ("greedy", "group_limited_greedy")

# no GQA and no head_dim: MLA sets its own head sizes (num_key_value_heads is written as the head count)
KEYS = CORE.but("num_query_groups", "head_dim")
MOE_KEYS = MOE + KeyTable((
    Key("aux_loss_coeff", "aux_loss_alpha", 0.0, read=number),
))
MLA_KEYS = KeyTable((
    Key("q_lora_rank", "q_lora_rank", None),  # null: no q compression (V2-Lite)
    Key("kv_lora_rank", "kv_lora_rank"),
    Key("qk_nope_head_dim", "qk_nope_head_dim"),
    Key("qk_rope_head_dim", "qk_rope_head_dim"),
    Key("v_head_dim", "v_head_dim"),
), MLAConfig)


def _need(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"DeepSeek config.json has no {key}; it is incomplete, so mzoo cannot tell the "
                          "architecture.")
    return hf[key]


def _routing_from_hf(hf: dict[str, Any], v3: bool) -> dict[str, Any]:
    """score_function, expert_bias and group limits, checked against what transformers runs."""
    kind = "DeepSeek-V3" if v3 else "DeepSeek-V2"
    method, scoring = hf["topk_method"], hf["scoring_func"]
    if scoring != ("sigmoid" if v3 else "softmax"):
        raise ConfigError(f"{kind} config has scoring_func '{scoring}', but transformers' {kind} always uses "
                          f"{'sigmoid' if v3 else 'softmax'}; fix config.json.")
    if v3 and method != "noaux_tc":
        raise ConfigError(f"DeepSeek-V3 config has topk_method '{method}', but transformers' DeepSeek-V3 only "
                          "runs noaux_tc (group-limited, aux-loss-free); fix config.json.")
    if not v3 and method not in V2_METHODS:
        raise ConfigError(f"DeepSeek-V2 config has topk_method '{method}'; transformers' DeepSeek-V2 runs "
                          f"{' or '.join(V2_METHODS)}.")
    if not v3 and hf["norm_topk_prob"]:
        raise ConfigError("DeepSeek-V2 config has norm_topk_prob true, which transformers' DeepSeek-V2 ignores "
                          "(it never renormalises); set it to false or convert the checkpoint as deepseek_v3.")
    grouped = v3 or method == "group_limited_greedy"
    n_group, topk_group = (hf["n_group"], hf["topk_group"]) if grouped else (None, None)
    if grouped and (n_group is None or topk_group is None):
        raise ConfigError(f"{kind} config routes group-limited but lacks n_group or topk_group; set both.")
    if n_group == 1:  # one group, all kept: plain top-k
        n_group = topk_group = None
    return {"score_function": "sigmoid" if v3 else "softmax", "expert_bias": v3, "n_group": n_group,
            "topk_group": topk_group}


def _with_defaults(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json over transformers' defaults for its model type (an explicit null q_lora_rank,
    n_group or topk_group is kept: it means "none")."""
    model_type = hf.get("model_type")
    if model_type not in DEFAULTS:
        raise ConfigError(f"model_type '{model_type}' is not a DeepSeek one; use deepseek_v2 or deepseek_v3.")
    nullable = ("q_lora_rank", "n_group", "topk_group")
    return {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k in nullable}}


# MoEConfig fields read from config.json outside the key tables
RAW_MOE = {"num_shared_experts": "n_shared_experts", "first_k_dense": "first_k_dense_replace", "n_group": "n_group",
           "topk_group": "topk_group", "layer_freq": "moe_layer_freq"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = _with_defaults(hf)
    for table in (KEYS, MOE_KEYS, MLA_KEYS):  # every value's type, by its key, before any arithmetic
        table.check(hf)
    raw = {f: key for f, key in RAW_MOE.items() if key in hf}
    check_types(MoEConfig, {f: hf[key] for f, key in raw.items()}, raw, "config.json")
    v3 = hf["model_type"] == "deepseek_v3"
    if hf.get("quantization_config"):
        raise ConfigError("this DeepSeek checkpoint is quantized (quantization_config in config.json); mzoo "
                          "converts only unquantized weights, so dequantize it to bf16 first.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"DeepSeek config has hidden_act '{hf['hidden_act']}'; mzoo's deepseek family needs "
                          "'silu'.")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("DeepSeek configs with attention_bias or mlp_bias true have no mzoo equivalent; set them "
                          "false.")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"DeepSeek config has moe_layer_freq {hf['moe_layer_freq']}, but transformers puts "
                          "experts in every layer after first_k_dense_replace; only moe_layer_freq 1 converts.")
    if v3 and hf.get("rope_interleave") is False:
        raise ConfigError("DeepSeek-V3 config has rope_interleave false; mzoo implements DeepSeek's interleaved "
                          "rope only.")
    shared = hf.get("n_shared_experts") or 0
    if shared < 1:
        raise ConfigError("DeepSeek config has no shared experts (n_shared_experts); transformers' DeepSeek needs "
                          "at least one, so mzoo cannot convert it.")
    first_k = min(hf["first_k_dense_replace"] or 0, _need(hf, "num_hidden_layers"))
    return ModelConfig(
        **KEYS.read(hf, need=_need),  # num_layers: MTP layers beyond it are not part of the main model
        family="deepseek",
        activation="swiglu",
        normalization="rmsnorm",
        position_embedding="rope",
        moe=MoEConfig(
            **MOE_KEYS.read(hf, need=_need),
            num_shared_experts=shared,
            first_k_dense=first_k,
            layer_freq=1,
            **_routing_from_hf(hf, v3),
        ),
        mla=MLAConfig(**MLA_KEYS.read(hf, need=_need)),
    )


def hf_model_type(cfg: ModelConfig) -> str:
    """deepseek_v3 for sigmoid (aux-loss-free) routing, deepseek_v2 for softmax."""
    sigmoid = cfg.moe is not None and (cfg.moe.score_function == "sigmoid" or cfg.moe.expert_bias)
    return "deepseek_v3" if sigmoid else "deepseek_v2"


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what DeepseekV2Config / DeepseekV3Config read; tests load it with transformers)."""
    moe, mla = cfg.moe, cfg.mla
    v3 = hf_model_type(cfg) == "deepseek_v3"
    needs = {
        "a moe section": moe is not None,
        "an mla section": mla is not None and cfg.ssm is None,
        "swiglu": cfg.activation == "swiglu",
        "rmsnorm": cfg.normalization == "rmsnorm",
        "full rope positions": cfg.position_embedding == "rope" and cfg.rope.rotary_percent == 1.0,
        "no biases": not (cfg.add_bias_linear or cfg.add_qkv_bias),
        "no qk_layernorm": not cfg.qk_layernorm,
    }
    if moe is not None:
        needs.update({
            "experts in every layer after the dense ones (layer_freq 1)": moe.layer_freq == 1,
            "at least one shared expert": moe.num_shared_experts >= 1,
            "shared experts as wide as the routed ones": (
                moe.shared_expert_ffn_hidden_size in (None, moe.ffn_hidden_size)
            ),
        })
        if v3:
            needs["sigmoid routing with expert_bias (DeepSeek-V3)"] = (
                moe.score_function == "sigmoid" and moe.expert_bias
            )
        else:
            needs["norm_topk_prob false (DeepSeek-V2 never renormalises)"] = not moe.norm_topk_prob
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise ConfigError(f"DeepSeek in transformers needs {', '.join(missing)}; this config differs.")
    out: dict[str, Any] = dict(
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        **KEYS.write(cfg),
        num_key_value_heads=cfg.num_attention_heads,
        **MOE_KEYS.write(moe),
        n_shared_experts=moe.num_shared_experts,
        first_k_dense_replace=moe.first_k_dense,
        moe_layer_freq=1,
        **MLA_KEYS.write(mla),
        hidden_act="silu",
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    if v3:
        out.update(
            topk_method="noaux_tc", scoring_func="sigmoid", n_group=moe.n_group or 1,
            topk_group=moe.topk_group or 1, rope_interleave=True, num_nextn_predict_layers=0,
            architectures=["DeepseekV3ForCausalLM"],
        )
    else:
        grouped = moe.n_group is not None
        out.update(
            topk_method="group_limited_greedy" if grouped else "greedy", scoring_func="softmax",
            n_group=moe.n_group, topk_group=moe.topk_group, mlp_bias=False,
            architectures=["DeepseekV2ForCausalLM"],
        )
    return out


V2 = register(Adapter("deepseek", "deepseek_v2", TABLE, config_from_hf, config_to_hf), as_family=False)
# family "deepseek" -> this one; its config_to_hf writes deepseek_v2 or deepseek_v3 by the routing
V3 = register(Adapter("deepseek", "deepseek_v3", TABLE, config_from_hf, config_to_hf))
ADAPTER = V3
