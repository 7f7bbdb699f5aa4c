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

from mzoo.config import ConfigError, ModelConfig, SSMConfig
from mzoo.converters import nemotron_h
from mzoo.converters.adapter import Adapter, register
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


def _base(hf: dict[str, Any], ssm: SSMConfig) -> ModelConfig:
    return ModelConfig(
        name=hf.get("_name_or_path", "") or "",
        family="mamba",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        ssm=ssm,
        **PURE,
    )


def mamba1_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _check(hf, "Mamba")
    hidden, expand = hf["hidden_size"], hf.get("expand", 2)
    if hf.get("intermediate_size", expand * hidden) != expand * hidden:
        raise ConfigError(f"Mamba intermediate_size {hf['intermediate_size']} is not expand x hidden_size "
                          f"({expand * hidden}); fix config.json.")
    rank = hf.get("time_step_rank", "auto")
    rank = None if rank in ("auto", math.ceil(hidden / 16)) else int(rank)
    return _base(hf, SSMConfig(version=1, d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4),
                               expand=expand, dt_rank=rank, conv_bias=bool(hf.get("use_conv_bias", True)),
                               proj_bias=bool(hf.get("use_bias", False))))


def mamba2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _check(hf, "Mamba-2")
    hidden, expand, head_dim = hf["hidden_size"], hf.get("expand", 2), hf.get("head_dim", 64)
    if hf.get("num_heads", expand * hidden // head_dim) * head_dim != expand * hidden:
        raise ConfigError(f"Mamba-2 num_heads x head_dim ({hf['num_heads'] * head_dim}) must equal expand x "
                          f"hidden_size ({expand * hidden}); fix config.json.")
    return _base({"tie_word_embeddings": False, **hf}, SSMConfig(
        version=2, d_state=hf.get("state_size", 128), d_conv=hf.get("conv_kernel", 4), expand=expand,
        head_dim=head_dim, num_groups=hf.get("n_groups", 8), chunk_size=hf.get("chunk_size", 256),
        conv_bias=bool(hf.get("use_conv_bias", True)), proj_bias=bool(hf.get("use_bias", False))))


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
    ssm = cfg.ssm
    return dict(
        model_type="mamba",
        architectures=["MambaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        state_size=ssm.d_state,
        conv_kernel=ssm.d_conv,
        expand=ssm.expand,
        time_step_rank=cfg.mamba_dims()["dt_rank"],
        use_bias=ssm.proj_bias,
        use_conv_bias=ssm.conv_bias,
        hidden_act="silu",
        layer_norm_epsilon=cfg.norm_eps,
        residual_in_fp32=True,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def mamba2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _pure_needs(cfg, "Mamba-2")
    ssm = cfg.ssm
    return dict(
        model_type="mamba2",
        architectures=["Mamba2ForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_heads=cfg.mamba_dims()["nheads"],
        head_dim=ssm.head_dim,
        state_size=ssm.d_state,
        n_groups=ssm.num_groups,
        chunk_size=ssm.chunk_size,
        conv_kernel=ssm.d_conv,
        expand=ssm.expand,
        use_bias=ssm.proj_bias,
        use_conv_bias=ssm.conv_bias,
        hidden_act="silu",
        layer_norm_epsilon=cfg.norm_eps,
        residual_in_fp32=True,
        tie_word_embeddings=cfg.tie_embeddings,
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
