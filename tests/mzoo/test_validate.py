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
