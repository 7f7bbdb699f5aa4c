"""ModelConfig: YAML round trip and one clear sentence for every impossible setting."""

from __future__ import annotations

import pytest

from mzoo.config import ConfigError, ModelConfig
from mzoo.layout import Layout
from mzoo.zoo import get, presets


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_round_trips_through_yaml(name, tmp_path):
    cfg = get(name).config
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    assert ModelConfig.from_yaml(path) == cfg


BAD = {
    "heads not divisible by groups": ({"num_attention_heads": 6, "num_query_groups": 4}, "divisible by num_query_groups"),
    "hidden not divisible by heads": ({"hidden_size": 100, "num_attention_heads": 6, "num_query_groups": 6}, "set head_dim"),
    "unknown key with suggestion": ({"hiden_size": 64}, "did you mean 'hidden_size'"),
    "wrong type": ({"num_layers": "two"}, "num_layers must be an integer"),
    "bad literal": ({"activation": "swish"}, "activation must be one of"),
    "unknown family": ({"family": "bert"}, "family 'bert' is unknown"),
    "llama3 scaling without original length": ({"rope": {"scaling": "llama3", "factor": 8.0}}, "original_max_position_embeddings"),
    "top_k > experts": ({"moe": {"num_experts": 4, "top_k": 5, "ffn_hidden_size": 8}}, "moe.top_k (5)"),
    "pattern length": ({"num_layers": 3, "ssm": {"hybrid_pattern": "M*"}}, "has 2 symbols but num_layers is 3"),
    "pattern symbol": ({"num_layers": 2, "ssm": {"hybrid_pattern": "MX"}}, "unknown symbols"),
    "negative size": ({"hidden_size": -4}, "hidden_size must be a positive integer"),
    "nested unknown key": ({"rope": {"thetaa": 1.0}}, "did you mean 'theta'"),
    "dense layer out of range": ({"moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 8, "dense_layers": [2]}},
                                 "increasing layer indices below num_layers (2)"),
    "dense layer already dense": ({"moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 8, "first_k_dense": 1,
                                           "dense_layers": [0]}}, "dense already, so drop them"),
    "empty window": ({"window_size": 0}, "window_size must be a positive number of tokens"),
    "window layers without a window": ({"window_attn_skip_freq": 2}, "window_attn_skip_freq needs a window_size"),
    "clamp on an ungated activation": ({"activation": "gelu", "activation_func_clamp_value": 7.0},
                                       "activation_func_clamp_value needs a gated activation"),
    "glu offset on an ungated activation": ({"activation": "gelu", "glu_linear_offset": 1.0}, "glu_linear_offset"),
    "unknown softmax type": ({"softmax_type": "off-by-one"}, "softmax_type must be one of"),
}


def test_moe_placement_has_one_spelling_per_pattern():
    """Qwen3-MoE's decoder_sparse_step / mlp_only_layers and Megatron's moe_layer_freq list read alike."""
    from mzoo.config import moe_placement

    assert moe_placement([1, 1, 1, 1]) == dict(first_k_dense=0, layer_freq=1, dense_layers=[])
    assert moe_placement([0, 1, 0, 1, 0, 1]) == dict(first_k_dense=1, layer_freq=2, dense_layers=[])
    assert moe_placement([0, 1, 0, 0, 0, 1]) == dict(first_k_dense=1, layer_freq=4, dense_layers=[])  # widest step
    assert moe_placement([0, 1, 0, 1, 0, 0, 0, 1]) == dict(first_k_dense=1, layer_freq=2, dense_layers=[5])
    assert moe_placement([1, 0, 1, 1]) == dict(first_k_dense=0, layer_freq=1, dense_layers=[1])
    cfg = get("qwen3-moe-tiny").config.replace(num_layers=8, **{"moe.first_k_dense": 1, "moe.layer_freq": 2,
                                                                 "moe.dense_layers": [5]})
    assert list(cfg.moe_layers) == [1, 3, 7] and cfg.block_kinds == {"attention", "mlp", "moe"}


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_fail_with_one_sentence(case):
    changes, expected = BAD[case]
    base = get("llama-tiny").config.to_dict()
    base.update(changes)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(base, where="test.yaml")
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and message.startswith("test.yaml")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("hidden_size: [64\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        ModelConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")


def test_replace_reaches_sub_configs_and_validates():
    cfg = get("llama-tiny").config
    assert cfg.replace(num_layers=3, **{"rope.theta": 5.0}).rope.theta == 5.0
    with pytest.raises(ConfigError):
        cfg.replace(num_query_groups=3)


@pytest.mark.parametrize(
    "layout, message",
    [
        (Layout(tp=3), "does not divide the 2 query groups"),
        (Layout(pp=3), "exceeds the 2 layers"),
        (Layout(tp=0), "--tp must be at least 1"),
    ],
)
def test_layouts_the_model_cannot_take(layout, message):
    with pytest.raises(ConfigError, match=message):
        layout.validate_for(get("llama-tiny").config)


def test_padded_vocab_follows_megatron():
    cfg = get("llama3-8b").config
    assert cfg.padded_vocab_size(1) == 128256
    assert cfg.padded_vocab_size(8) == 129024


def test_window_layers_follow_megatrons_skip_freq():
    """window_attn_skip_freq N: every Nth layer (1-based) attends fully, as Megatron's
    is_layer_window_attention and transformers' GPT-OSS layer_types (sliding first)."""
    cfg = get("gpt-oss-20b").config
    assert [cfg.is_window_layer(i) for i in range(4)] == [True, False, True, False]
    assert all(map(cfg.replace(window_attn_skip_freq=None).is_window_layer, range(4)))
    assert not any(map(get("llama-tiny").config.is_window_layer, range(2)))


def test_block_kinds_answer_which_blocks_a_model_has():
    """One answer for validation, `zoo list`/`show` and cards: hybrids hold what their pattern says."""
    assert get("llama-tiny").config.block_kinds == {"attention", "mlp"}
    assert get("mixtral-tiny").config.block_kinds == {"attention", "moe"}
    assert get("mamba-tiny").config.block_kinds == {"mamba"}
    assert get("mamba-hybrid-tiny").config.block_kinds == {"attention", "mamba", "mlp"}
    no_attention = get("mamba-hybrid-tiny").config.replace(**{"ssm.hybrid_pattern": "M--M"})
    assert no_attention.block_kinds == {"mamba", "mlp"}
