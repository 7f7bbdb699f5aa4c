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

from typing import Any, Optional

from mzoo.config import ConfigError, ModelConfig, MoEConfig, SSMConfig, check_value
from mzoo.converters.config_map import CORE, MOE, Key, KeyTable, Reading, boolean
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



def _head_dim(head_dim: Optional[int], reading: Reading) -> Optional[int]:
    """None where head_dim x num_attention_heads is hidden_size (absent: hidden_size // heads)."""
    hidden, heads = reading.fields["hidden_size"], reading.fields["num_attention_heads"]
    head_dim = head_dim or hidden // heads
    return None if head_dim * heads == hidden else head_dim


# NemotronHConfig's defaults; no num_hidden_layers (the layer pattern says), rope or tied embeddings
KEYS = CORE.but(
    "num_layers", "rope", "tie_embeddings",
    num_attention_heads=dict(default=32),
    head_dim=dict(read=_head_dim),
    ffn_hidden_size=dict(default=0),
    norm_eps=dict(hf="layer_norm_epsilon", default=1e-5),
    max_position_embeddings=dict(default=4096),
)
# SSMConfig fields (expand follows from the Mamba head count, see config_from_hf)
SSM_KEYS = KeyTable((
    Key("d_state", "ssm_state_size"),
    Key("d_conv", "conv_kernel", 4),
    Key("head_dim", "mamba_head_dim"),
    Key("num_groups", "n_groups", 8),
    Key("chunk_size", "chunk_size", 128),
    Key("conv_bias", "use_conv_bias", True, read=boolean),
    Key("proj_bias", "use_bias", False, read=boolean),
), SSMConfig)
# one shared expert, as wide as moe_shared_expert_intermediate_size
MOE_KEYS = MOE + KeyTable((
    Key("shared_expert_ffn_hidden_size", "moe_shared_expert_intermediate_size",
        write=lambda moe: moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size),
))


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
        **MOE_KEYS.read(hf),
        num_shared_experts=1,
        score_function="sigmoid",
        expert_bias=True,
        n_group=n_group if n_group > 1 else None,
        topk_group=hf.get("topk_group", 1) if n_group > 1 else None,
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    for table in (KEYS, SSM_KEYS, MOE_KEYS):  # every value's type, by its key, before any arithmetic
        table.check(hf)
    for key in ("mamba_num_heads", "n_group", "topk_group"):
        if key in hf:
            check_value(int if key == "mamba_num_heads" else Optional[int], hf[key], f"config.json: {key}")
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
    return ModelConfig(
        **KEYS.read(hf),
        family="mamba",
        num_layers=len(pattern),
        activation=HF_TO_MZOO_ACTIVATION[act],
        normalization="rmsnorm",
        position_embedding="none",
        tie_embeddings=False,  # transformers' NemotronH never ties lm_head
        moe=_moe_from_hf(hf) if "E" in pattern else None,
        ssm=SSMConfig(**SSM_KEYS.read(hf), version=2, expand=heads * head_dim // hidden, hybrid_pattern=pattern),
    )


def _moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    if moe is None:
        return {}
    return dict(
        **MOE_KEYS.write(moe),
        n_shared_experts=1,
        n_group=moe.n_group or 1,
        topk_group=moe.topk_group or 1,
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
        **KEYS.write(cfg),
        layers_block_type=[BLOCK_TYPES[c] for c in pattern],
        hybrid_override_pattern=pattern,  # the pre-5 spelling (remote code, vLLM); 5 drops it for the list
        num_hidden_layers=len(pattern),  # likewise; 5 derives it from the list
        attention_bias=False,
        mlp_hidden_act=MZOO_TO_HF_ACTIVATION[cfg.activation],
        mlp_bias=False,
        **SSM_KEYS.write(ssm),
        mamba_num_heads=dims["nheads"],
        mamba_hidden_act="silu",
        expand=ssm.expand,
        tie_word_embeddings=False,
        residual_in_fp32=False,
        num_nextn_predict_layers=0,
        **_moe_to_hf(cfg),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
