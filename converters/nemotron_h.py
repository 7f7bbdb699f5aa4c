"""NemotronH (transformers' NemotronHForCausalLM) <-> canonical: Megatron's hybrid stack as NVIDIA
publishes it.

Its `hybrid_override_pattern` (in transformers 5 the list `layers_block_type`) is mzoo's
`ssm.hybrid_pattern`. Every layer is `backbone.layers.N.norm` + `backbone.layers.N.mixer`, the mixer
being a Mamba-2 mixer (M), attention without position embeddings (*), a non-gated MLP (-) or a
sigmoid-routed MoE with one shared expert and non-gated experts (E). The layer's norm is the norm
fused into its first linear, or the MoE layer's separate `pre_mlp_layernorm`.

This module holds the rows of attention, MLP and MoE layers and the config.json mapping;
converters/mamba.py joins the rows with the Mamba ones into the family's single table (Mamba,
Mamba-2 and NemotronH checkpoints all use `backbone.*` names) and registers the model type.

transformers never ties NemotronH's `lm_head` to the embeddings (whatever `tie_word_embeddings`
says, it loads `lm_head.weight`), so the adapter reads untied models and writes only untied ones.

Known difference: transformers' NemotronH clamps softplus(dt) from below at `time_step_min`;
Megatron's kernels and mzoo do not, so outputs differ where dt falls below it (0.001 by default).
mzoo writes `time_step_min` as transformers' default.
"""

from __future__ import annotations

from typing import Any

from mzoo.config import ConfigError, ModelConfig, MoEConfig, SSMConfig
from mzoo.converters.mapping import QKV, Direct

L = "decoder.layers.*."
B = "backbone.layers.*."
EXPERT = L + "mlp.experts.local_experts.*."

ROWS = [
    Direct(L + "self_attention.linear_qkv.layer_norm_weight", B + "norm.weight"),
    QKV(L + "self_attention.linear_qkv.weight",
        {"q": B + "mixer.q_proj.weight", "k": B + "mixer.k_proj.weight", "v": B + "mixer.v_proj.weight"}),
    Direct(L + "self_attention.linear_proj.weight", B + "mixer.o_proj.weight"),
    Direct(L + "mlp.linear_fc1.layer_norm_weight", B + "norm.weight"),
    Direct(L + "mlp.linear_fc1.weight", B + "mixer.up_proj.weight"),
    Direct(L + "mlp.linear_fc2.weight", B + "mixer.down_proj.weight"),
    Direct(L + "pre_mlp_layernorm.weight", B + "norm.weight"),
    Direct(L + "mlp.router.weight", B + "mixer.gate.weight"),
    Direct(L + "mlp.router.expert_bias", B + "mixer.gate.e_score_correction_bias"),
    Direct(EXPERT + "linear_fc1.weight", B + "mixer.experts.*.up_proj.weight"),
    Direct(EXPERT + "linear_fc2.weight", B + "mixer.experts.*.down_proj.weight"),
    Direct(L + "mlp.shared_experts.linear_fc1.weight", B + "mixer.shared_experts.up_proj.weight"),
    Direct(L + "mlp.shared_experts.linear_fc2.weight", B + "mixer.shared_experts.down_proj.weight"),
]

SYMBOLS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-",
           "moe": "E"}
BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
HF_TO_MZOO_ACTIVATION = {"relu2": "squared_relu", "relu": "relu", "gelu": "gelu",
                         "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "silu": "silu"}
MZOO_TO_HF_ACTIVATION = {"squared_relu": "relu2", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                         "silu": "silu"}


def pattern_from_hf(hf: dict[str, Any]) -> str:
    """The Megatron pattern from `layers_block_type` (transformers 5) or `hybrid_override_pattern`."""
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types:
        unknown = sorted(set(types) - set(SYMBOLS))
        if unknown:
            raise ConfigError(f"NemotronH layers_block_type has unknown layer types {unknown}; mzoo knows "
                              f"{', '.join(sorted(SYMBOLS))}.")
        return "".join(SYMBOLS[t] for t in types)
    pattern = hf.get("hybrid_override_pattern")
    if not pattern:
        raise ConfigError("NemotronH config.json has neither layers_block_type nor hybrid_override_pattern; "
                          "add the layer pattern.")
    return pattern


def _moe_from_hf(hf: dict[str, Any]) -> MoEConfig:
    n_group = hf.get("n_group", 1) or 1
    return MoEConfig(
        num_experts=hf["n_routed_experts"],
        top_k=hf["num_experts_per_tok"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        num_shared_experts=1,
        shared_expert_ffn_hidden_size=hf["moe_shared_expert_intermediate_size"],
        score_function="sigmoid",
        expert_bias=True,
        n_group=n_group if n_group > 1 else None,
        topk_group=hf.get("topk_group", 1) if n_group > 1 else None,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    pattern = pattern_from_hf(hf)
    hidden = hf["hidden_size"]
    heads, head_dim = hf["mamba_num_heads"], hf["mamba_head_dim"]
    act = hf.get("mlp_hidden_act", "relu2")
    problems = {
        "mamba_hidden_act": hf.get("mamba_hidden_act", "silu") != "silu",
        "mlp_hidden_act": act not in HF_TO_MZOO_ACTIVATION,
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "moe_latent_size": hf.get("moe_latent_size") is not None,
        "sliding_window": hf.get("sliding_window") is not None,
    }
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ConfigError(f"NemotronH config sets {', '.join(bad)} to a value mzoo cannot express (it needs "
                          f"silu Mamba, an MLP activation in {', '.join(HF_TO_MZOO_ACTIVATION)}, no MLP biases, "
                          "no MoE latent projection and full attention).")
    if heads * head_dim % hidden:
        raise ConfigError(f"NemotronH mamba_num_heads x mamba_head_dim ({heads * head_dim}) is not a "
                          f"multiple of hidden_size ({hidden}), which mzoo's ssm.expand cannot express.")
    attention_heads = hf.get("num_attention_heads", 32)
    hd = hf.get("head_dim") or hidden // attention_heads
    return ModelConfig(
        name=hf.get("_name_or_path", "") or "",
        family="mamba",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=len(pattern),
        num_attention_heads=attention_heads,
        num_query_groups=hf.get("num_key_value_heads") or attention_heads,
        head_dim=None if hd * attention_heads == hidden else hd,
        ffn_hidden_size=hf.get("intermediate_size", 0),
        activation=HF_TO_MZOO_ACTIVATION[act],
        normalization="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        position_embedding="none",
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_embeddings=False,  # transformers' NemotronH never ties lm_head
        moe=_moe_from_hf(hf) if "E" in pattern else None,
        ssm=SSMConfig(
            version=2,
            d_state=hf["ssm_state_size"],
            d_conv=hf.get("conv_kernel", 4),
            expand=heads * head_dim // hidden,
            head_dim=head_dim,
            num_groups=hf.get("n_groups", 8),
            chunk_size=hf.get("chunk_size", 128),
            conv_bias=bool(hf.get("use_conv_bias", True)),
            proj_bias=bool(hf.get("use_bias", False)),
            hybrid_pattern=pattern,
        ),
    )


def _moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    if moe is None:
        return {}
    return dict(
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size,
        n_shared_experts=1,
        n_group=moe.n_group or 1,
        topk_group=moe.topk_group or 1,
        routed_scaling_factor=moe.routed_scaling_factor,
        norm_topk_prob=moe.norm_topk_prob,
        moe_latent_size=None,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what NemotronHConfig reads; tests load it with transformers itself)."""
    ssm, moe = cfg.ssm, cfg.moe
    needs = {
        "Mamba-2 mixers (ssm.version 2)": ssm is not None and ssm.version == 2,
        "rmsnorm": cfg.normalization == "rmsnorm",
        "no position embeddings": cfg.position_embedding == "none",
        f"an MLP activation in {', '.join(MZOO_TO_HF_ACTIVATION)}": cfg.activation in MZOO_TO_HF_ACTIVATION,
        "no biases outside the Mamba projections": not (cfg.add_bias_linear or cfg.add_qkv_bias),
        "standard attention (no mla, no qk_layernorm)": cfg.mla is None and not cfg.qk_layernorm,
        "untied embeddings (it never ties lm_head)": not cfg.tie_embeddings,
    }
    if moe is not None:
        needs["sigmoid routing with expert_bias and one shared expert"] = (
            moe.score_function == "sigmoid" and moe.expert_bias and moe.num_shared_experts == 1)
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise ConfigError(f"NemotronH in transformers needs {', '.join(missing)}; this config differs.")
    dims = cfg.mamba_dims()
    pattern = ssm.hybrid_pattern or "M" * cfg.num_layers
    return dict(
        model_type="nemotron_h",
        architectures=["NemotronHForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        layers_block_type=[BLOCK_TYPES[c] for c in pattern],
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.groups,
        head_dim=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=False,
        intermediate_size=cfg.ffn_hidden_size,
        mlp_hidden_act=MZOO_TO_HF_ACTIVATION[cfg.activation],
        mlp_bias=False,
        ssm_state_size=ssm.d_state,
        mamba_num_heads=dims["nheads"],
        mamba_head_dim=ssm.head_dim,
        mamba_hidden_act="silu",
        n_groups=ssm.num_groups,
        conv_kernel=ssm.d_conv,
        expand=ssm.expand,
        chunk_size=ssm.chunk_size,
        use_conv_bias=ssm.conv_bias,
        use_bias=ssm.proj_bias,
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=False,
        residual_in_fp32=False,
        num_nextn_predict_layers=0,
        **_moe_to_hf(cfg),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
