"""Mixtral, DeepSeek (V2, V2-Lite, V3) and GPT-OSS adapters (and Qwen3-MoE's fused spelling): config round trips through transformers' own
config classes, HF -> canonical -> HF bit-exact on every tensor, the fused in-memory expert spelling
on read, ignored MTP layers, presets transformers accepts, and one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import all_safetensors, hf_roundtrip, make_moe_model
from informative import perturb_hf_
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, GptOssConfig,
                          MixtralConfig, Qwen3MoeConfig)

from mzoo.ckpt.hf import HFReader
from mzoo.config import ConfigError
from mzoo.converters import deepseek, for_family, for_hf_config, mixtral
from mzoo.converters.hf import save_hf
from mzoo.converters.mapping import Direct, GatedMLP, MappingTable
from mzoo.models.canonical import canonical_tensors, random_canonical
from mzoo.zoo import get

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
MLA = dict(vocab_size=160, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
           first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           max_position_embeddings=128)

CONFIGS = {
    "mixtral": MixtralConfig(vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=128, router_aux_loss_coef=0.02),
    "v2-lite": DeepseekV2Config(**MLA, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                                rope_parameters=YARN),
    "v2-grouped": DeepseekV2Config(**MLA, q_lora_rank=16, n_shared_experts=1, topk_method="group_limited_greedy",
                                   n_group=2, topk_group=1, routed_scaling_factor=16.0),
    "v3": DeepseekV3Config(**MLA, q_lora_rank=16, n_shared_experts=1, n_group=2, topk_group=1,
                           rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "gpt-oss": GptOssConfig(vocab_size=200, hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256, swiglu_limit=3.0),
    "gpt-oss-all-windowed": GptOssConfig(vocab_size=200, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_local_experts=2,
                                         num_experts_per_tok=1, layer_types=["sliding_attention"] * 3),
    "v3-no-q-lora-tied": DeepseekV3Config(**{**MLA, "first_k_dense_replace": 0}, q_lora_rank=None, n_shared_experts=2,
                                          n_group=1, topk_group=1, norm_topk_prob=False, tie_word_embeddings=True),
}

# what each transformers config must keep through HF -> mzoo -> HF
KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "rms_norm_eps",
        "tie_word_embeddings", "rope_parameters", "max_position_embeddings")
MIXTRAL_KEYS = KEYS + ("num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                       "router_aux_loss_coef")
DEEPSEEK_KEYS = KEYS + ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                        "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob", "q_lora_rank",
                        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group")
GPT_OSS_KEYS = MIXTRAL_KEYS + ("sliding_window", "layer_types", "swiglu_limit", "swiglu_alpha", "attention_bias")


def _hf_dict(config) -> dict:
    return json.loads(config.to_json_string())


def _arch(config) -> dict:
    keys = {"mixtral": MIXTRAL_KEYS, "gpt_oss": GPT_OSS_KEYS}.get(config.model_type, DEEPSEEK_KEYS)
    out = {k: getattr(config, k) for k in keys}
    if config.model_type == "mixtral":
        out["head_dim"] = config.head_dim or config.hidden_size // config.num_attention_heads
    if config.model_type == "deepseek_v2":
        out["topk_method"] = config.topk_method
    return out




# ---- (a) config round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONFIGS)
def test_config_round_trip_through_transformers(case):
    original = CONFIGS[case]
    hf = _hf_dict(original)
    adapter = for_hf_config(hf)
    cfg = adapter.config_from_hf(hf)
    cfg.validate(case)
    written = for_family(cfg.family).config_to_hf(cfg)
    assert written["model_type"] == original.model_type
    again = AutoConfig.for_model(**written)
    assert _arch(again) == _arch(original)
    back = for_hf_config(_hf_dict(again)).config_from_hf(_hf_dict(again))
    assert back == cfg


def test_config_fields_map_as_documented():
    m = mixtral.config_from_hf(_hf_dict(CONFIGS["mixtral"]))
    assert (m.family, m.ffn_hidden_size, m.moe.ffn_hidden_size, m.moe.num_experts, m.moe.top_k) == ("mixtral", 48, 48, 4, 2)
    assert m.moe.aux_loss_coeff == 0.02 and m.moe.norm_topk_prob and m.groups == 2 and m.rope.theta == 1e6
    lite = deepseek.config_from_hf(_hf_dict(CONFIGS["v2-lite"]))
    assert lite.mla.q_lora_rank is None and lite.moe.n_group is None and lite.moe.score_function == "softmax"
    assert lite.rope.scaling == "yarn" and lite.rope.mscale == 0.707 and lite.rope.original_max_position_embeddings == 32
    assert lite.moe.first_k_dense == 1 and lite.moe.num_shared_experts == 2 and not lite.moe.expert_bias
    grouped = deepseek.config_from_hf(_hf_dict(CONFIGS["v2-grouped"]))
    assert (grouped.moe.n_group, grouped.moe.topk_group, grouped.moe.routed_scaling_factor) == (2, 1, 16.0)
    v3 = deepseek.config_from_hf(_hf_dict(CONFIGS["v3"]))
    assert v3.moe.score_function == "sigmoid" and v3.moe.expert_bias and v3.moe.n_group == 2
    one_group = deepseek.config_from_hf(_hf_dict(CONFIGS["v3-no-q-lora-tied"]))
    assert one_group.moe.n_group is None and one_group.tie_embeddings and not one_group.moe.norm_topk_prob
    # the family resolves to one adapter, whose config_to_hf picks V2 or V3 by the routing
    assert for_family("deepseek").config_to_hf(lite)["model_type"] == "deepseek_v2"
    assert for_family("deepseek").config_to_hf(v3)["model_type"] == "deepseek_v3"
    assert for_hf_config({"model_type": "deepseek_v2"}) is deepseek.V2


@pytest.mark.parametrize("preset", ["mixtral-tiny", "mixtral-8x7b", "mixtral-8x22b", "deepseek-tiny",
                                    "deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "gpt-oss-tiny", "gpt-oss-20b",
                                    "gpt-oss-120b"])
def test_presets_are_configs_transformers_builds(preset):
    p = get(preset)
    written = for_family(p.config.family).config_to_hf(p.config)
    hf = AutoConfig.for_model(**written)
    back = for_hf_config(_hf_dict(hf)).config_from_hf(_hf_dict(hf))
    assert p.config.architecture_differences(back) == [] and back.rope == p.config.rope
    with torch.device("meta"):  # the very parameter count mzoo reports, in transformers' own model
        model = AutoModelForCausalLM.from_config(hf)
    count = sum(t.numel() for t in model.parameters())
    count += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert count == p.count.total


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "gpt-oss-20b",
                                    "gpt-oss-120b"])
def test_published_config_spelling_reads_as_the_preset(preset):
    """Hub config.json files predate transformers 5: top-level rope_theta, rope_scaling with 'type',
    and (DeepSeek) extra keys such as MTP layers and seq_aux that mzoo ignores."""
    cfg = get(preset).config
    hf = for_family(cfg.family).config_to_hf(cfg)
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    hf["rope_scaling"] = {"type": kind, **rope} if kind != "default" else None
    if cfg.family == "deepseek":
        hf.update(num_nextn_predict_layers=1, seq_aux=True, ep_size=1, head_dim=None)
    if cfg.family == "gpt_oss":  # openai's config.json: the MXFP4 note (the HF reader's concern) and extras
        hf.update(initial_context_length=4096, experts_per_token=4,
                  quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]})
    back = for_hf_config(hf).config_from_hf(hf)
    assert cfg.architecture_differences(back) == [] and back.rope == cfg.rope


# ---- mapping table with two wildcards --------------------------------------------------------------
def test_two_wildcard_patterns_and_read_only_spellings():
    table = MappingTable([
        Direct("decoder.layers.*.mlp.router.weight", "model.layers.*.gate.weight"),
        GatedMLP("decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
                 {"gate": "model.layers.*.experts.*.w1.weight", "up": "model.layers.*.experts.*.w3.weight"}),
        Direct("decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight", "model.layers.*.gate_up[*]"),
    ])
    assert table.resolve("decoder.layers.12.mlp.router.weight")[1] == {"x": "model.layers.12.gate.weight"}
    found = table.candidates("decoder.layers.3.mlp.experts.local_experts.10.linear_fc1.weight")
    assert [names for _, names in found] == [
        {"gate": "model.layers.3.experts.10.w1.weight", "up": "model.layers.3.experts.10.w3.weight"},
        {"x": "model.layers.3.gate_up[10]"},
    ]
    assert table.resolve("decoder.layers.3.mlp.experts.local_experts.10.linear_fc2.weight") is None


# ---- (b) HF -> canonical -> HF, bit-exact ------------------------------------------------------------
@pytest.mark.parametrize("case", ["mixtral", "v2-lite", "v2-grouped", "v3", "v3-no-q-lora-tied", "gpt-oss"])
def test_hf_canonical_hf_is_bit_exact(tmp_path, case):
    src = make_moe_model(tmp_path / "src", CONFIGS[case])
    hf_roundtrip(src, tmp_path / "out")
    before, after = all_safetensors(src), all_safetensors(tmp_path / "out")
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == CONFIGS[case].model_type


@pytest.mark.parametrize("preset", ["mixtral-tiny", "deepseek-tiny", "gpt-oss-tiny"])
def test_init_writes_what_from_pretrained_loads(tmp_path, preset):
    cfg = get(preset).config
    out = save_hf(cfg, random_canonical(cfg, seed=3), tmp_path / preset)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")) == get(preset).count.total


# ---- (c) fused in-memory spelling on read, MTP layers ignored -----------------------------------------
def _save_both_spellings(config, path: Path) -> tuple[Path, Path]:
    """One random model saved twice: by save_pretrained (per-expert names) and as its in-memory
    state dict (fused [E, 2F, H] gate_up_proj and [E, H, F] down_proj per layer), which is what
    code skipping transformers' save-time rename writes, and what transformers itself writes again
    for a model it loaded from such a checkpoint."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_hf_(model, moe=True)  # a norm or expert-score correction either reader lost would show
    model.save_pretrained(path / "per_expert")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    (path / "fused").mkdir()
    save_file(state, str(path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path / "fused")
    return path / "fused", path / "per_expert"


# Qwen3-MoE: layer 0 dense (mlp_only_layers), layer 1 routed; the same on-disk expert names as DeepSeek's
FUSED = {**CONFIGS, "qwen3-moe": Qwen3MoeConfig(vocab_size=200, hidden_size=32, intermediate_size=48,
                                                moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, head_dim=16, num_experts=4,
                                                num_experts_per_tok=2, mlp_only_layers=[0],
                                                max_position_embeddings=128)}


@pytest.mark.parametrize("case", ["mixtral", "v3", "qwen3-moe"])
def test_fused_expert_spelling_reads_like_per_expert(tmp_path, case):
    fused, per_expert = _save_both_spellings(FUSED[case], tmp_path)
    a, b = HFReader(fused), HFReader(per_expert)
    assert not any(".experts.0." in n for n in a.names()) and any(".experts.0." in n for n in b.names())
    # transformers reads both spellings into the same model
    ref = AutoModelForCausalLM.from_pretrained(per_expert).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in AutoModelForCausalLM.from_pretrained(fused).state_dict().items())
    adapter = for_hf_config(a.config)
    cfg = adapter.config_from_hf(a.config)
    names = [t.name for t in canonical_tensors(cfg)]
    assert any(".local_experts.3.linear_fc2" in n for n in names)
    for name in names:
        assert torch.equal(adapter.to_canonical(name, a.get, cfg), adapter.to_canonical(name, b.get, cfg)), name
    # a plain callable (no reader behind it) finds the fused spelling by trying
    tensors = load_file(fused / "model.safetensors")
    expert = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"
    assert torch.equal(adapter.to_canonical(expert, tensors.__getitem__, cfg), adapter.to_canonical(expert, b.get, cfg))
    # writing always uses the per-expert names, bit-exact to what save_pretrained wrote
    hf_roundtrip(fused, tmp_path / "out")
    after, before = all_safetensors(tmp_path / "out"), all_safetensors(per_expert)
    assert set(after) == set(before) and all(torch.equal(v, after[k]) for k, v in before.items())


def test_mtp_layers_are_ignored(tmp_path):
    src = make_moe_model(tmp_path / "src", CONFIGS["v3"])
    tensors = load_file(src / "model.safetensors")
    extra = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items() if ".layers.2." in k}
    extra["model.layers.3.eh_proj.weight"] = torch.randn(32, 64)
    save_file({**tensors, **extra}, str(src / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "num_nextn_predict_layers": 1}))
    cfg = hf_roundtrip(src, tmp_path / "out")
    assert cfg.num_layers == 3
    assert set(all_safetensors(tmp_path / "out")) == set(tensors)


# ---- (d) one-sentence errors -------------------------------------------------------------------------
def _one_sentence(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text
    return text


@pytest.mark.parametrize("case, change, match", [
    ("mixtral", {"sliding_window": 64}, "sliding_window"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
    ("v2-lite", {"attention_bias": True}, "attention_bias"),
    ("v2-lite", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("v2-lite", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("v2-lite", {"topk_method": "noaux_tc"}, "topk_method"),
    ("v2-grouped", {"n_group": None}, "n_group"),
    ("v2-lite", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("v3", {"topk_method": "greedy"}, "topk_method"),
    ("v3", {"rope_interleave": False}, "rope_interleave"),
    ("v3", {"n_shared_experts": 0}, "shared experts"),
    ("v3", {"quantization_config": {"quant_method": "fp8"}}, "quantized"),
    ("v3", {"kv_lora_rank": None}, "kv_lora_rank"),
    ("gpt-oss", {"swiglu_alpha": 1.5}, "swiglu_alpha"),
    ("gpt-oss", {"attention_bias": False}, "attention_bias"),
    ("gpt-oss", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
])
def test_unsupported_hf_configs_fail_with_one_sentence(case, change, match):
    hf = {**_hf_dict(CONFIGS[case]), **change}
    with pytest.raises(ConfigError, match=match) as e:
        for_hf_config(hf).config_from_hf(hf)
    _one_sentence(e)


def test_mixtral_sliding_window_covering_every_position_is_fine():
    hf = {**_hf_dict(CONFIGS["mixtral"]), "sliding_window": 128}
    assert mixtral.config_from_hf(hf).max_position_embeddings == 128


@pytest.mark.parametrize("preset, changes, match", [
    ("mixtral-tiny", {"moe.num_shared_experts": 1}, "no shared experts"),
    ("mixtral-tiny", {"moe.first_k_dense": 1}, "experts in every layer"),
    ("mixtral-tiny", {"ffn_hidden_size": 128}, "ffn_hidden_size"),
    ("mixtral-tiny", {"moe.score_function": "sigmoid"}, "softmax routing"),
    ("deepseek-tiny", {"moe.expert_bias": False}, "expert_bias"),
    ("deepseek-tiny", {"moe.layer_freq": 2}, "layer_freq"),
    ("gpt-oss-tiny", {"softmax_type": "vanilla"}, "attention sinks"),
    ("gpt-oss-tiny", {"glu_linear_offset": 0.0}, "glu_linear_offset 1"),
    ("deepseek-tiny", {"moe.shared_expert_ffn_hidden_size": 64}, "shared experts as wide"),
    ("deepseek-tiny", {"moe.score_function": "softmax", "moe.expert_bias": False, "moe.norm_topk_prob": True},
     "norm_topk_prob"),
])
def test_configs_transformers_cannot_express_fail_before_writing(tmp_path, preset, changes, match):
    cfg = get(preset).config.replace(**changes)
    with pytest.raises(ConfigError, match=match) as e:
        save_hf(cfg, iter([("embedding.word_embeddings.weight", torch.zeros(1))]), tmp_path / "out")
    _one_sentence(e)
    assert not (tmp_path / "out").exists()


def test_family_mismatch_fails_with_one_sentence():
    with pytest.raises(ConfigError, match="mla") as e:
        mixtral.config_to_hf(get("deepseek-tiny").config)
    _one_sentence(e)
    with pytest.raises(ConfigError, match="mla section") as e:
        deepseek.config_to_hf(get("mixtral-tiny").config)
    _one_sentence(e)


def test_missing_fused_rows_are_a_checkpoint_error(tmp_path):
    from mzoo.ckpt.hf import CheckpointError

    fused, _ = _save_both_spellings(CONFIGS["mixtral"], tmp_path)
    tensors = load_file(fused / "model.safetensors")
    tensors["model.layers.0.mlp.experts.down_proj"] = tensors["model.layers.0.mlp.experts.down_proj"][:2].clone()
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    reader = HFReader(fused)
    cfg = mixtral.config_from_hf(reader.config)
    with pytest.raises(CheckpointError, match="no row 3") as e:
        mixtral.ADAPTER.to_canonical("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight", reader.get, cfg)
    _one_sentence(e)
