"""Qwen2 / Qwen2.5, Qwen3 and Qwen3-MoE <-> canonical: config.json and the weight mapping tables.

All three are the LLaMA decoder with a twist in attention, so they share the LLaMA names:
- Qwen2 / Qwen2.5 (`qwen2`): q/k/v biases without an o bias (Megatron's add_qkv_bias without
  add_bias_linear); tied and untied embeddings;
- Qwen3 (`qwen3`): no biases, a per-head RMSNorm on q and k before the rope (Megatron's
  qk_layernorm: `self_attention.q_layernorm` / `k_layernorm`), and a head_dim of its own
  (128 in every published size, whatever hidden / heads is);
- Qwen3-MoE (`qwen3_moe`): Qwen3 attention with routed experts and no shared ones: softmax top-k,
  renormalised when norm_topk_prob; a layer is sparse when `(i + 1) % decoder_sparse_step == 0` and
  i is not in mlp_only_layers (MoEConfig's first_k_dense, layer_freq and dense_layers say the same).
  On disk the experts are `mlp.experts.{e}.gate_proj/up_proj/down_proj` and the router `mlp.gate`;
  transformers 5's fused in-memory spelling (`mlp.experts.gate_up_proj` [E, 2F, H]) is read too.

The sliding-window fields are in every published config but off (use_sliding_window false): a
config that turns them on is refused, since mzoo has no sliding-window attention here.
"""

from __future__ import annotations

from typing import Any, Optional

from mzoo.config import ConfigError, ModelConfig, MoEConfig, moe_placement
from mzoo.converters import llama
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.config_map import CORE, Key, KeyTable, Reading, boolean, number
from mzoo.converters.mapping import Direct, GatedMLP, MappingTable

L = "decoder.layers.*."
H = "model.layers.*."
EXPERT = L + "mlp.experts.local_experts.*."
HF_EXPERT = H + "mlp.experts.*."

_QK_NORM = [
    Direct(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
    Direct(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
]

# LLaMA's rows (its o-projection and MLP bias rows are never asked for: no Qwen has add_bias_linear)
QWEN2_TABLE = llama.TABLE
QWEN3_TABLE = MappingTable(llama.TABLE.mappings + _QK_NORM)
QWEN3_MOE_TABLE = MappingTable(QWEN3_TABLE.mappings + [  # LLaMA's dense MLP rows serve mlp_only_layers
    Direct(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    Direct(L + "mlp.router.weight", H + "mlp.gate.weight"),
    GatedMLP(EXPERT + "linear_fc1.weight", {"gate": HF_EXPERT + "gate_proj.weight", "up": HF_EXPERT + "up_proj.weight"}),
    Direct(EXPERT + "linear_fc1.weight", H + "mlp.experts.gate_up_proj[*]"),  # fused spelling, read only
    Direct(EXPERT + "linear_fc2.weight", HF_EXPERT + "down_proj.weight"),
    Direct(EXPERT + "linear_fc2.weight", H + "mlp.experts.down_proj[*]"),  # fused spelling, read only
])


def _head_dim(default: Optional[int]):
    """head_dim read with the config class's default for a missing key (Qwen2: hidden / heads; Qwen3:
    128); None where it is hidden_size // num_attention_heads, the ModelConfig default."""
    def read(value: Optional[int], reading: Reading) -> Optional[int]:
        fields = reading.fields
        derived = fields["hidden_size"] // fields["num_attention_heads"]
        head_dim = value or default or derived
        return None if head_dim == derived else head_dim
    return read


# Qwen2Config / Qwen3Config defaults on the shared table (positions 32768; eps 1e-6 and theta 1e4 as CORE)
QWEN2_KEYS = CORE.but(head_dim=dict(read=_head_dim(None)), max_position_embeddings=dict(default=32768))
QWEN3_KEYS = QWEN2_KEYS.but(head_dim=dict(read=_head_dim(128)))
def _experts(value: Optional[int], reading: Reading) -> int:
    """transformers 5 writes num_local_experts, published configs (4.x) num_experts; either is read."""
    return value if value is not None else reading.hf.get("num_experts", 128)


# MoEConfig fields in Qwen3MoeConfig's spelling and defaults (both spellings of the expert count written)
MOE_KEYS = KeyTable((
    Key("num_experts", "num_local_experts", None, read=_experts, legacy=lambda moe: {"num_experts": moe.num_experts}),
    Key("top_k", "num_experts_per_tok", 8),
    Key("ffn_hidden_size", "moe_intermediate_size", 768),
    Key("norm_topk_prob", "norm_topk_prob", False, read=boolean),
    Key("aux_loss_coeff", "router_aux_loss_coef", 0.001, read=number),
), MoEConfig)


def _check_common(hf: dict[str, Any], keys: KeyTable, name: str) -> None:
    """What every Qwen config must be for mzoo to build the same network: SiLU, full attention."""
    keys.check(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{name} config has hidden_act '{hf['hidden_act']}'; mzoo's Qwen families need 'silu'.")
    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"{name} config turns on sliding-window attention (use_sliding_window / layer_types), which "
                          "mzoo does not implement yet; set use_sliding_window to false (every published Qwen "
                          "config has it off).")


def _qwen3_attention(hf: dict[str, Any], name: str) -> None:
    if hf.get("attention_bias"):
        raise ConfigError(f"{name} config has attention_bias true (q/k/v/o biases without MLP biases), which "
                          "Megatron's add_bias_linear cannot express; set attention_bias to false.")


def qwen2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _check_common(hf, QWEN2_KEYS, "Qwen2")
    return ModelConfig(**QWEN2_KEYS.read(hf), family="qwen2", activation="swiglu", normalization="rmsnorm",
                       position_embedding="rope", add_qkv_bias=True)


def qwen3_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _check_common(hf, QWEN3_KEYS, "Qwen3")
    _qwen3_attention(hf, "Qwen3")
    return ModelConfig(**QWEN3_KEYS.read(hf), family="qwen3", activation="swiglu", normalization="rmsnorm",
                       position_embedding="rope", qk_layernorm=True)


def qwen3_moe_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _check_common(hf, QWEN3_KEYS, "Qwen3-MoE")
    MOE_KEYS.check(hf)
    _qwen3_attention(hf, "Qwen3-MoE")
    fields = QWEN3_KEYS.read(hf)
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"config.json: decoder_sparse_step must be a positive integer, got {step!r}.")
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ConfigError(f"config.json: mlp_only_layers must list layer indices, got {dense!r}.")
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(fields["num_layers"])]
    if not any(pattern):
        raise ConfigError("Qwen3-MoE config has no sparse layer (decoder_sparse_step / mlp_only_layers leave none); "
                          "convert it as a dense qwen3 model instead.")
    return ModelConfig(
        **fields,  # ffn_hidden_size: intermediate_size, the dense (mlp_only) layers' FFN
        family="qwen3_moe", activation="swiglu", normalization="rmsnorm", position_embedding="rope",
        qk_layernorm=True,
        moe=MoEConfig(**MOE_KEYS.read(hf), score_function="softmax", **moe_placement(pattern)),
    )


def _refuse(name: str, needs: dict[str, bool]) -> None:
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise ConfigError(f"{name} in transformers needs {', '.join(missing)}; this config differs.")


def _needs(cfg: ModelConfig) -> dict[str, bool]:
    return {
        "standard attention (no mla)": cfg.mla is None and cfg.ssm is None,
        "swiglu": cfg.activation == "swiglu",
        "rmsnorm": cfg.normalization == "rmsnorm",
        "rope positions": cfg.position_embedding == "rope",
        "no MLP or output-projection biases (add_bias_linear false)": not cfg.add_bias_linear,
    }


def _common_to_hf(cfg: ModelConfig, keys: KeyTable, model_type: str, architecture: str) -> dict[str, Any]:
    return dict(
        model_type=model_type,
        **keys.write(cfg),
        hidden_act="silu",
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=cfg.num_layers,
        architectures=[architecture],
        bos_token_id=None,
        eos_token_id=None,
    )


def qwen2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what Qwen2Config reads; tests load it with transformers itself)."""
    _refuse("Qwen2", {**_needs(cfg), "a dense model (no moe section)": cfg.moe is None,
                      "q/k/v biases (add_qkv_bias)": cfg.add_qkv_bias, "no qk_layernorm": not cfg.qk_layernorm})
    return _common_to_hf(cfg, QWEN2_KEYS, "qwen2", "Qwen2ForCausalLM")


def qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what Qwen3Config reads)."""
    _refuse("Qwen3", {**_needs(cfg), "a dense model (no moe section)": cfg.moe is None,
                      "no q/k/v biases": not cfg.add_qkv_bias, "qk_layernorm": cfg.qk_layernorm})
    return dict(**_common_to_hf(cfg, QWEN3_KEYS, "qwen3", "Qwen3ForCausalLM"), attention_bias=False)


def _sparse_step(cfg: ModelConfig) -> int:
    """decoder_sparse_step: layer_freq when its sparse layers, (i + 1) % step == 0, hold every MoE
    layer (the others go to mlp_only_layers); else 1."""
    step = cfg.moe.layer_freq
    return step if all((i + 1) % step == 0 for i in cfg.moe_layers) else 1


def qwen3_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents (what Qwen3MoeConfig reads)."""
    moe = cfg.moe
    needs = {**_needs(cfg), "a moe section": moe is not None, "no q/k/v biases": not cfg.add_qkv_bias,
             "qk_layernorm": cfg.qk_layernorm}
    if moe is not None:
        needs.update({
            "softmax routing without expert_bias or groups": (
                moe.score_function == "softmax" and not moe.expert_bias and moe.n_group is None
            ),
            "unscaled top-k weights (routed_scaling_factor 1)": moe.routed_scaling_factor == 1.0,
            "no shared experts": moe.num_shared_experts == 0,
        })
    _refuse("Qwen3-MoE", needs)
    step = _sparse_step(cfg)
    routed = set(cfg.moe_layers)
    return dict(
        **_common_to_hf(cfg, QWEN3_KEYS, "qwen3_moe", "Qwen3MoeForCausalLM"),
        attention_bias=False,
        **MOE_KEYS.write(moe),
        decoder_sparse_step=step,
        mlp_only_layers=[i for i in range(cfg.num_layers) if (i + 1) % step == 0 and i not in routed],
        output_router_logits=False,
    )


QWEN2 = register(Adapter("qwen2", "qwen2", QWEN2_TABLE, qwen2_from_hf, qwen2_to_hf))
QWEN3 = register(Adapter("qwen3", "qwen3", QWEN3_TABLE, qwen3_from_hf, qwen3_to_hf))
QWEN3_MOE = register(Adapter("qwen3_moe", "qwen3_moe", QWEN3_MOE_TABLE, qwen3_moe_from_hf, qwen3_moe_to_hf))
