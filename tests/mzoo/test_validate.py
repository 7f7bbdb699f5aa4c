"""Issue 17 (validate): the argument rules, the TP split check and config.json types, below the CLI."""

from __future__ import annotations

import math

import pytest

from mzoo.config import ConfigError
from mzoo.validate import FRACTION, POSITIVE, PROBABILITY, ArgumentError, check
from mzoo.zoo import resolve


@pytest.mark.parametrize("value", [0, -1, math.nan, True, 1.5e400])
def test_positive_refuses_what_is_not_a_size(value):
    with pytest.raises(ArgumentError, match=r"^--x must be at least 1, got "):
        check("--x", value, POSITIVE)


def test_rules_take_their_boundaries_and_none():
    check("--x", 1, POSITIVE)
    check("--p", 1.0, PROBABILITY)
    check("--f", 0.0, FRACTION)
    check("--x", None, POSITIVE)  # not given
    for rule, bad in ((PROBABILITY, 0.0), (FRACTION, 1.0)):
        with pytest.raises(ArgumentError):
            check("--v", bad, rule)


def test_check_split_names_the_expert_ffn_and_respects_expert_tp():
    from mzoo.models.canonical import plan_tensors
    from mzoo.parallel.sharding import check_split

    cfg = resolve("mixtral-tiny")  # experts' ffn 96, hidden 64, 4 heads, 2 groups
    tensors = plan_tensors(cfg.replace(**{"moe.ffn_hidden_size": 100}))
    with pytest.raises(ConfigError, match="does not divide the expert FFN size 100"):
        check_split(tensors, tp=2, expert_tp=8)
    check_split(tensors, tp=2, expert_tp=1)  # Megatron's ETP1: experts whole, dense parts split by 2


def test_check_split_covers_mamba_mixers():
    from mzoo.models.canonical import plan_tensors
    from mzoo.parallel.sharding import check_split

    cfg = resolve("mamba1-tiny")
    with pytest.raises(ConfigError, match="Mamba mixer size"):
        check_split(plan_tensors(cfg), tp=3)


@pytest.mark.parametrize("value", [True, 2.0, None, "two"])
def test_a_config_json_layer_count_of_the_wrong_type_names_its_key(value):
    from mzoo.converters.llama import config_from_hf

    hf = {"model_type": "llama", "vocab_size": 96, "hidden_size": 48, "intermediate_size": 160,
          "num_hidden_layers": value, "num_attention_heads": 6, "num_key_value_heads": 3}
    with pytest.raises(ConfigError, match=r"num_hidden_layers must be an integer, got "):
        config_from_hf(hf)


def test_a_config_json_of_the_right_types_still_reads():
    from mzoo.converters.llama import config_from_hf

    cfg = config_from_hf({"model_type": "llama", "vocab_size": 96, "hidden_size": 48, "intermediate_size": 160,
                          "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3})
    assert cfg.num_layers == 2 and cfg.ffn_hidden_size == 160


# config.json sections (MoE, MLA, Mamba): each key's value of the wrong type is one sentence naming the key
SECTION_SLIPS = [
    ("deepseek-tiny", "num_experts_per_tok", "2", "must be an integer"),
    ("deepseek-tiny", "n_routed_experts", True, "must be an integer"),
    ("deepseek-tiny", "n_shared_experts", "1", "must be an integer"),
    ("deepseek-tiny", "first_k_dense_replace", 1.0, "must be an integer"),
    ("deepseek-tiny", "routed_scaling_factor", "x", "must be a number"),
    ("deepseek-tiny", "norm_topk_prob", "yes", "must be true or false"),
    ("deepseek-tiny", "qk_rope_head_dim", "8", "must be an integer"),
    ("deepseek-tiny", "kv_lora_rank", 2.0, "must be an integer"),
    ("mixtral-tiny", "num_local_experts", "4", "must be an integer"),
    ("mixtral-tiny", "num_experts_per_tok", True, "must be an integer"),
    ("mixtral-tiny", "router_aux_loss_coef", "x", "must be a number"),
    ("mamba-tiny", "state_size", "16", "must be an integer"),
    ("mamba-tiny", "expand", 2.5, "must be an integer"),
    ("mamba-tiny", "num_heads", "4", "must be an integer"),
    ("mamba-tiny", "use_conv_bias", 1, "must be true or false"),
    ("mamba1-tiny", "time_step_rank", "x", "must be an integer"),
    ("mamba-hybrid-tiny", "mamba_num_heads", "4", "must be an integer"),
    ("mamba-hybrid-tiny", "ssm_state_size", "16", "must be an integer"),
    ("mamba-hybrid-tiny", "n_groups", True, "must be an integer"),
]


def _hf_config(preset: str) -> dict:
    """The config.json mzoo writes for a tiny preset (transformers reads it back in the converter tests)."""
    from mzoo.converters import for_family

    return for_family(resolve(preset).family).config_to_hf(resolve(preset))


@pytest.mark.parametrize("preset, key, value, want", SECTION_SLIPS, ids=[f"{p}-{k}" for p, k, _, _ in SECTION_SLIPS])
def test_a_config_json_section_value_of_the_wrong_type_names_its_key(preset, key, value, want):
    from mzoo.converters import for_hf_config

    hf = _hf_config(preset)
    assert key in hf or key == "time_step_rank"  # the key mzoo writes (Mamba-1's rank: "auto" when left out)
    hf[key] = value
    with pytest.raises(ConfigError, match=rf"^config\.json: {key} {want}, got "):
        for_hf_config(hf).config_from_hf(hf)


@pytest.mark.parametrize("preset", sorted({p for p, _, _, _ in SECTION_SLIPS}))
def test_the_section_configs_of_the_right_types_still_read(preset):
    from mzoo.converters import for_hf_config

    hf = _hf_config(preset)
    cfg = for_hf_config(hf).config_from_hf(hf)
    assert cfg.architecture_differences(resolve(preset)) == []
