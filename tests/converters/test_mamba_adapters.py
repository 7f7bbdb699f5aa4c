"""Mamba, Mamba-2 and NemotronH adapters: config round trips through transformers' own config classes,
HF -> canonical -> HF bit-exact on every tensor, presets transformers builds with the same parameter
count, random init that from_pretrained loads, and one-sentence errors for what mzoo or transformers
cannot express."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import all_safetensors, hf_roundtrip, make_moe_model
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2Config, MambaConfig, NemotronHConfig

from mzoo.config import ConfigError, ModelConfig
from mzoo.converters import for_family, for_hf_config
from mzoo.converters.hf import save_hf
from mzoo.layout import Layout
from mzoo.models import build_model, meta_model
from mzoo.models.canonical import canonical_tensors, random_canonical
from mzoo.parallel.state import ParallelState
from mzoo.zoo import get

HYBRID = dict(vocab_size=160, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=48, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, chunk_size=8)
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24)
CONFIGS = {
    "mamba": MambaConfig(vocab_size=160, hidden_size=32, num_hidden_layers=2, state_size=8, time_step_rank=3,
                         use_bias=True, use_conv_bias=False),
    "mamba-untied-k2": MambaConfig(vocab_size=160, hidden_size=48, num_hidden_layers=2, expand=1, conv_kernel=2,
                                   tie_word_embeddings=False),
    "mamba2": Mamba2Config(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=2,
                           state_size=8, chunk_size=16),
    "mamba2-tied-biases": Mamba2Config(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                                       n_groups=1, state_size=16, chunk_size=8, use_bias=True, use_conv_bias=False,
                                       tie_word_embeddings=True),
    "nemotron_h": NemotronHConfig(**HYBRID, layers_block_type=["linear_attention", "full_attention", "mlp",
                                                                "linear_attention"]),
    "nemotron_h-moe": NemotronHConfig(**HYBRID, **MOE, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                      mlp_hidden_act="gelu", tie_word_embeddings=True,  # ignored: never tied
                                      layers_block_type=["linear_attention", "moe", "full_attention", "mlp"]),
}

# what each transformers config must keep through HF -> mzoo -> HF
COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "layer_norm_epsilon", "use_bias", "use_conv_bias",
          "conv_kernel", "expand", "chunk_size")
KEYS = {
    "mamba": COMMON[:-1] + ("tie_word_embeddings", "state_size", "time_step_rank", "intermediate_size"),
    "mamba2": COMMON + ("tie_word_embeddings", "state_size", "num_heads", "head_dim", "n_groups"),
    "nemotron_h": COMMON + ("layers_block_type", "num_attention_heads", "num_key_value_heads", "head_dim",
                            "intermediate_size", "mlp_hidden_act", "ssm_state_size", "mamba_num_heads",
                            "mamba_head_dim", "n_groups", "n_routed_experts", "num_experts_per_tok",
                            "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group", "topk_group",
                            "routed_scaling_factor", "norm_topk_prob"),
}


def _hf_dict(config) -> dict:
    return json.loads(config.to_json_string())


def _arch(config) -> dict:
    keys = KEYS[config.model_type]
    if config.model_type == "nemotron_h" and "moe" not in config.layers_block_type:
        keys = keys[: keys.index("n_routed_experts")]
    return {k: getattr(config, k) for k in keys}




def _one_sentence(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text
    return text


# ---- config round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONFIGS)
def test_config_round_trip_through_transformers(case):
    original = CONFIGS[case]
    hf = _hf_dict(original)
    cfg = for_hf_config(hf).config_from_hf(hf)
    cfg.validate(case)
    written = for_family(cfg.family).config_to_hf(cfg)
    assert written["model_type"] == original.model_type
    again = AutoConfig.for_model(**written)
    assert _arch(again) == _arch(original)
    assert for_hf_config(_hf_dict(again)).config_from_hf(_hf_dict(again)) == cfg


def test_config_fields_map_as_documented():
    m1 = for_hf_config(_hf_dict(CONFIGS["mamba"])).config_from_hf(_hf_dict(CONFIGS["mamba"]))
    assert (m1.family, m1.ssm.version, m1.ssm.d_state, m1.ssm.dt_rank, m1.ssm.proj_bias, m1.ssm.conv_bias) == (
        "mamba", 1, 8, 3, True, False)
    assert m1.tie_embeddings and m1.position_embedding == "none" and m1.layer_types == ["mamba", "mamba"]
    default_rank = for_hf_config(_hf_dict(CONFIGS["mamba-untied-k2"])).config_from_hf(_hf_dict(CONFIGS["mamba-untied-k2"]))
    assert default_rank.ssm.dt_rank is None and default_rank.mamba_dims()["dt_rank"] == 3  # ceil(48 / 16)
    m2 = for_hf_config(_hf_dict(CONFIGS["mamba2"])).config_from_hf(_hf_dict(CONFIGS["mamba2"]))
    assert (m2.ssm.version, m2.ssm.head_dim, m2.ssm.num_groups, m2.ssm.chunk_size, m2.mamba_dims()["nheads"]) == (
        2, 16, 2, 16, 4)
    assert not m2.tie_embeddings
    nh = for_hf_config(_hf_dict(CONFIGS["nemotron_h-moe"])).config_from_hf(_hf_dict(CONFIGS["nemotron_h-moe"]))
    assert nh.ssm.hybrid_pattern == "ME*-" and nh.activation == "gelu" and nh.groups == 2 and nh.head_dim is None
    assert not nh.tie_embeddings  # transformers loads NemotronH's lm_head whatever tie_word_embeddings says
    assert (nh.moe.num_experts, nh.moe.n_group, nh.moe.topk_group, nh.moe.routed_scaling_factor) == (4, 2, 1, 2.5)
    assert nh.moe.score_function == "sigmoid" and nh.moe.expert_bias and nh.moe.shared_expert_ffn_hidden_size == 24
    legacy = {**_hf_dict(CONFIGS["nemotron_h"]), "hybrid_override_pattern": "M*-M"}
    del legacy["layers_block_type"]
    assert for_hf_config(legacy).config_from_hf(legacy).ssm.hybrid_pattern == "M*-M"
    # one adapter for the family; the config decides the model type it writes
    assert for_family("mamba").config_to_hf(get("mamba1-tiny").config)["model_type"] == "mamba"
    assert for_family("mamba").config_to_hf(get("mamba-tiny").config)["model_type"] == "mamba2"
    assert for_family("mamba").config_to_hf(get("mamba-hybrid-tiny").config)["model_type"] == "nemotron_h"


PRESETS = ["mamba1-tiny", "mamba-tiny", "mamba-hybrid-tiny", "mamba-130m", "mamba-2.8b", "mamba2-130m", "mamba2-2.7b",
           "mamba2-hybrid-8b"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_configs_transformers_builds(preset):
    p = get(preset)
    written = for_family(p.config.family).config_to_hf(p.config)
    hf = AutoConfig.for_model(**written)
    back = for_hf_config(_hf_dict(hf)).config_from_hf(_hf_dict(hf))
    assert p.config.architecture_differences(back) == []
    with torch.device("meta"):  # the very parameter count mzoo reports, in transformers' own model
        model = AutoModelForCausalLM.from_config(hf)
    assert sum(t.numel() for t in model.parameters()) == p.count.total


# ---- weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONFIGS)
def test_hf_canonical_hf_is_bit_exact(tmp_path, case):
    src = make_moe_model(tmp_path / "src", CONFIGS[case])
    cfg = hf_roundtrip(src, tmp_path / "out")
    before, after = all_safetensors(src), all_safetensors(tmp_path / "out")
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == CONFIGS[case].model_type
    names = {t.name for t in canonical_tensors(cfg)}
    assert "decoder.final_norm.weight" in names and ("output_layer.weight" in names) != cfg.tie_embeddings


def test_canonical_names_and_layouts():
    """Megatron's names, with in_proj split into its sections and the conv over [x | B | C]."""
    cfg = get("mamba-hybrid-tiny").config
    shapes = {t.name: (t.shape, t.spec) for t in canonical_tensors(cfg)}
    d_inner, gn, heads = 128, 2 * 16, 8
    shape, spec = shapes["decoder.layers.0.mixer.in_proj.weight"]
    assert shape == (2 * d_inner + 2 * gn + heads, 64) and spec.sections == (d_inner, d_inner, gn, gn, heads)
    shape, spec = shapes["decoder.layers.0.mixer.conv1d.weight"]
    assert shape == (d_inner + 2 * gn, 1, 4) and spec.sections == (d_inner, gn, gn)
    assert shapes["decoder.layers.0.mixer.out_proj.weight"][1].dim == 1
    for leaf, size in (("A_log", heads), ("D", heads), ("dt_bias", heads), ("norm.weight", d_inner),
                       ("in_proj.layer_norm_weight", 64)):
        assert shapes[f"decoder.layers.3.mixer.{leaf}"][0] == (size,)
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in shapes
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in shapes
    m1 = {t.name: t.shape for t in canonical_tensors(get("mamba1-tiny").config)}
    assert m1["decoder.layers.1.mixer.A_log"] == (128, 8) and m1["decoder.layers.1.mixer.x_proj.weight"] == (4 + 16, 128)
    assert m1["decoder.layers.1.mixer.dt_proj.weight"] == (128, 4) and "output_layer.weight" not in m1


@pytest.mark.parametrize("preset", ["mamba1-tiny", "mamba-tiny", "mamba-hybrid-tiny"])
def test_init_writes_what_from_pretrained_loads(tmp_path, preset):
    cfg = get(preset).config
    out = save_hf(cfg, random_canonical(cfg, seed=3), tmp_path / preset)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert sum(p.numel() for p in model.parameters()) == get(preset).count.total


# ---- one-sentence errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("case, change, match", [
    ("mamba", {"hidden_act": "gelu"}, "hidden_act"),
    ("mamba", {"intermediate_size": 100}, "intermediate_size"),
    ("mamba2", {"time_step_limit": [0.0, 10.0]}, "time_step_limit"),
    ("mamba2", {"num_heads": 3}, "num_heads"),
    ("nemotron_h", {"moe_latent_size": 8}, "moe_latent_size"),
    ("nemotron_h", {"mlp_bias": True}, "mlp_bias"),
    ("nemotron_h", {"mamba_hidden_act": "gelu"}, "mamba_hidden_act"),
    ("nemotron_h", {"sliding_window": 16}, "sliding_window"),
    ("nemotron_h", {"mlp_hidden_act": "swish_glu"}, "mlp_hidden_act"),
    ("nemotron_h", {"mamba_num_heads": 3}, "mamba_num_heads"),
    ("nemotron_h", {"layers_block_type": ["linear_attention", "cross_attention"]}, "cross_attention"),
])
def test_unsupported_hf_configs_fail_with_one_sentence(case, change, match):
    hf = {**_hf_dict(CONFIGS[case]), **change}
    with pytest.raises(ConfigError, match=match) as e:
        for_hf_config(hf).config_from_hf(hf)
    _one_sentence(e)


@pytest.mark.parametrize("preset, changes, match", [
    ("mamba1-tiny", {"ssm.hybrid_pattern": "M*"}, "Mamba-1"),
    ("mamba-tiny", {"normalization": "layernorm"}, "rmsnorm"),
    ("mamba-hybrid-tiny", {"activation": "swiglu"}, "MLP activation"),
    ("mamba-hybrid-tiny", {"position_embedding": "rope"}, "no position embeddings"),
    ("mamba-hybrid-tiny", {"tie_embeddings": True}, "untied embeddings"),
    ("mamba-hybrid-tiny", {"ssm.hybrid_pattern": "M*EM", "moe": {"num_experts": 4, "ffn_hidden_size": 16}},
     "sigmoid routing"),
])
def test_configs_transformers_cannot_express_fail_before_writing(tmp_path, preset, changes, match):
    cfg = get(preset).config.replace(**changes)
    with pytest.raises(ConfigError, match=match) as e:
        save_hf(cfg, iter([("embedding.word_embeddings.weight", torch.zeros(1))]), tmp_path / "out")
    _one_sentence(e)
    assert not (tmp_path / "out").exists()


def test_bad_layouts_and_patterns_fail_with_one_sentence():
    cfg = get("mamba-tiny").config  # 8 heads in 2 groups
    with pytest.raises(ConfigError, match="groups") as e:
        Layout(tp=4).validate_for(cfg)
    _one_sentence(e)
    with pytest.raises(ConfigError, match="groups") as e:  # and the model says the same when built anyway
        build_model(cfg, ParallelState.single(Layout(tp=4)), device="meta")
    _one_sentence(e)
    assert meta_model(cfg, Layout(tp=2)).decoder.layers[0].mixer.A_log.shape == (4,)
    with pytest.raises(ConfigError, match="num_layers") as e:
        get("mamba-hybrid-tiny").config.replace(**{"ssm.hybrid_pattern": "M*-"})
    _one_sentence(e)
    with pytest.raises(ConfigError, match="unknown symbols") as e:
        get("mamba-hybrid-tiny").config.replace(**{"ssm.hybrid_pattern": "M*+M"})
    _one_sentence(e)
    with pytest.raises(ConfigError, match="ssm section") as e:
        build_model(ModelConfig(family="mamba", vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4,
                                ffn_hidden_size=64), device="meta")
    _one_sentence(e)
