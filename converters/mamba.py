"""The mamba family <-> Hugging Face: Mamba-1 (MambaForCausalLM), Mamba-2 (Mamba2ForCausalLM) and
Mamba/attention hybrids (NemotronHForCausalLM, see converters/nemotron_h.py).

All three write `backbone.embeddings`, `backbone.layers.N.norm` + `backbone.layers.N.mixer.*`,
`backbone.norm_f` and `lm_head` (not stored when tied), and their mixer tensors have the same
names and layouts as Megatron's (`in_proj` rows [x | z] for Mamba-1, [z | x | B | C | dt] for
Mamba-2), so the family has one table of direct renames. Which model type a config is written as
follows from it: a hybrid pattern is NemotronH, otherwise ssm.version picks Mamba or Mamba-2.

Accepted and not modelled: `residual_in_fp32` (mzoo keeps the residual in the model dtype; the same
in fp32) and the init-only settings (time_step_*, initializer_range, rescale_prenorm_residual).
"""

from __future__ import annotations

import math
from typing import Any

from mzoo.config import ConfigError, ModelConfig, SSMConfig, check_value
from mzoo.converters import nemotron_h
from mzoo.converters.adapter import Adapter, register
from mzoo.converters.config_map import CORE, Key, KeyTable, boolean
from mzoo.converters.mapping import Direct, MappingTable

L = "decoder.layers.*."
B = "backbone.layers.*."
MIXER = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
         "dt_proj.bias", "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight", "out_proj.bias")

TABLE = MappingTable([
    Direct("embedding.word_embeddings.weight", "backbone.embeddings.weight"),
    Direct("decoder.final_norm.weight", "backbone.norm_f.weight"),
    Direct("output_layer.weight", "lm_head.weight"),
    Direct(L + "mixer.in_proj.layer_norm_weight", B + "norm.weight"),
    *(Direct(L + "mixer." + leaf, B + "mixer." + leaf) for leaf in MIXER),
    *nemotron_h.ROWS,
])

PURE = dict(num_attention_heads=1, ffn_hidden_size=0, activation="silu", normalization="rmsnorm",
            position_embedding="none")  # what a model without attention or MLP layers sets

# MambaConfig's defaults; no attention, MLP or rope keys, and max_position_embeddings only read
KEYS = CORE.but(
    "num_attention_heads", "num_query_groups", "head_dim", "ffn_hidden_size", "rope",
    norm_eps=dict(hf="layer_norm_epsilon", default=1e-5),
    max_position_embeddings=dict(written=False),
    tie_embeddings=dict(default=True),
)
MAMBA2_KEYS = KEYS.but(tie_embeddings=dict(default=False))  # Mamba2Config unties by default
# SSMConfig fields as MambaConfig spells them (dt_rank: see mamba1_from_hf)
SSM_KEYS = KeyTable((
    Key("d_state", "state_size", 16),
    Key("d_conv", "conv_kernel", 4),
    Key("expand", "expand", 2),
    Key("conv_bias", "use_conv_bias", True, read=boolean),
    Key("proj_bias", "use_bias", False, read=boolean),
), SSMConfig)
# Mamba2Config adds multi-head SSM keys (num_heads: see mamba2_from_hf)
SSM2_KEYS = SSM_KEYS.but(d_state=dict(default=128)) + KeyTable((
    Key("head_dim", "head_dim", 64),
    Key("num_groups", "n_groups", 8),
    Key("chunk_size", "chunk_size", 256),
))


def _number(value: Any) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def _check(hf: dict[str, Any], kind: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{kind} config has hidden_act '{hf['hidden_act']}'; Mamba mixers in mzoo use "
                          "silu.")
    limit = [_number(v) for v in hf.get("time_step_limit") or (0.0, math.inf)]
    if limit[0] > 0.0 or math.isfinite(limit[1]):
        raise ConfigError(f"{kind} config clamps dt with time_step_limit {limit}, which mzoo (like "
                          "Megatron) does not do; remove time_step_limit.")


def mamba1_from_hf(hf: dict[str, Any]) -> ModelConfig:
    KEYS.check(hf)
    SSM_KEYS.check(hf)
    if hf.get("time_step_rank", "auto") != "auto":
        check_value(int, hf["time_step_rank"], "config.json: time_step_rank")
    _check(hf, "Mamba")
    hidden, expand = hf["hidden_size"], SSM_KEYS["expand"].get(hf)
    if hf.get("intermediate_size", expand * hidden) != expand * hidden:
        raise ConfigError(f"Mamba intermediate_size {hf['intermediate_size']} is not expand x hidden_size "
                          f"({expand * hidden}); fix config.json.")
    rank = hf.get("time_step_rank", "auto")
    rank = None if rank in ("auto", math.ceil(hidden / 16)) else int(rank)
    ssm = SSMConfig(version=1, **SSM_KEYS.read(hf), dt_rank=rank)
    return ModelConfig(**KEYS.read(hf), family="mamba", ssm=ssm, **PURE)


def mamba2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    MAMBA2_KEYS.check(hf)
    SSM2_KEYS.check(hf)
    if "num_heads" in hf:
        check_value(int, hf["num_heads"], "config.json: num_heads")
    _check(hf, "Mamba-2")
    hidden, expand, head_dim = hf["hidden_size"], SSM2_KEYS["expand"].get(hf), SSM2_KEYS["head_dim"].get(hf)
    if hf.get("num_heads", expand * hidden // head_dim) * head_dim != expand * hidden:
        raise ConfigError(f"Mamba-2 num_heads x head_dim ({hf['num_heads'] * head_dim}) must equal expand x "
                          f"hidden_size ({expand * hidden}); fix config.json.")
    ssm = SSMConfig(version=2, **SSM2_KEYS.read(hf))
    return ModelConfig(**MAMBA2_KEYS.read(hf), family="mamba", ssm=ssm, **PURE)


READERS = {"mamba": mamba1_from_hf, "mamba2": mamba2_from_hf, "nemotron_h": nemotron_h.config_from_hf}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return READERS[hf["model_type"]](hf)


def _pure_needs(cfg: ModelConfig, kind: str) -> None:
    needs = {
        "rmsnorm": cfg.normalization == "rmsnorm",
        "no position embeddings": cfg.position_embedding == "none",
    }
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        raise ConfigError(f"{kind} in transformers needs {', '.join(missing)}; this config differs.")


def mamba1_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _pure_needs(cfg, "Mamba")
    return dict(
        model_type="mamba",
        architectures=["MambaForCausalLM"],
        **KEYS.write(cfg),
        **SSM_KEYS.write(cfg.ssm),
        time_step_rank=cfg.mamba_dims()["dt_rank"],
        hidden_act="silu",
        residual_in_fp32=True,
    )


def mamba2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _pure_needs(cfg, "Mamba-2")
    return dict(
        model_type="mamba2",
        architectures=["Mamba2ForCausalLM"],
        **MAMBA2_KEYS.write(cfg),
        **SSM2_KEYS.write(cfg.ssm),
        num_heads=cfg.mamba_dims()["nheads"],
        hidden_act="silu",
        residual_in_fp32=True,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for the model type that expresses `cfg`: NemotronH for hybrids, else by version."""
    ssm = cfg.ssm
    if ssm is None:
        raise ConfigError(f"{cfg.name or 'this config'} has no ssm section, so it is not a Mamba model.")
    if ssm.hybrid_pattern:
        if ssm.version == 1:
            raise ConfigError("transformers has no hybrid model with Mamba-1 mixers; use ssm.version 2 or "
                              "drop ssm.hybrid_pattern.")
        return nemotron_h.config_to_hf(cfg)
    return mamba1_to_hf(cfg) if ssm.version == 1 else mamba2_to_hf(cfg)


MAMBA = register(Adapter("mamba", "mamba", TABLE, config_from_hf, config_to_hf))
MAMBA2 = register(Adapter("mamba", "mamba2", TABLE, config_from_hf, config_to_hf), as_family=False)
NEMOTRON_H = register(Adapter("mamba", "nemotron_h", TABLE, config_from_hf, config_to_hf), as_family=False)
