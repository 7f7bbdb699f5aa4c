"""HF <-> canonical: bit-exact tensor round trips, config round trips through transformers' config
classes, sharded output, mzoo init, and bad input that fails with one sentence and no output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from mzoo.ckpt.atomic import OutputError
from mzoo.ckpt.hf import CheckpointError, HFReader
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.config import ConfigError
from mzoo.converters import for_hf_config
from mzoo.converters.hf import save_hf
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.jobs.verify import against_transformers
from mzoo.models.canonical import random_canonical
from mzoo.zoo import get

CONFIGS = {
    "llama-gqa-tied": LlamaConfig(vocab_size=999, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                                  num_key_value_heads=3, intermediate_size=200, tie_word_embeddings=True),
    "llama3-scaled": LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=160,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 32}),
    "gpt2": GPT2Config(vocab_size=1001, n_embd=64, n_head=4, n_layer=2, n_positions=64),
}


def _all_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", CONFIGS)
def test_hf_canonical_hf_is_bit_exact(hf_factory, tmp_path, case):
    src = hf_factory(CONFIGS[case])
    dst = tmp_path / "out"
    convert(open_source(src), dst, Target("hf", max_shard_bytes=20_000))
    before, after = _all_tensors(src), _all_tensors(dst)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert (dst / "model.safetensors.index.json").exists()  # small shards force an index
    # config.json survives: transformers reads back the same architecture
    a = json.loads((src / "config.json").read_text())
    b = json.loads((dst / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "n_embd", "n_head",
                "rope_parameters", "tie_word_embeddings", "intermediate_size", "n_inner"):
        assert a.get(key) == b.get(key), key
    assert against_transformers(dst).match


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny", "qwen2-tiny", "qwen3-tiny", "qwen3-moe-tiny"])
def test_init_writes_what_from_pretrained_loads(tmp_path, preset):
    cfg = get(preset).config
    out = save_hf(cfg, random_canonical(cfg, seed=7), tmp_path / preset, dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == get(preset).count.total
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (out / "mzoo.yaml").exists() and (out / "generation_config.json").exists()
    # same seed, same weights
    again = save_hf(cfg, random_canonical(cfg, seed=7), tmp_path / "again", dtype=torch.bfloat16)
    assert all(torch.equal(v, _all_tensors(again)[k]) for k, v in _all_tensors(out).items())


def test_truncated_safetensors_is_reported(hf_factory):
    src = hf_factory(CONFIGS["gpt2"])
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        HFReader(src)


def test_index_pointing_outside_the_folder_is_refused(hf_factory, tmp_path):
    src = hf_factory(CONFIGS["gpt2"])
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(src / "model.safetensors", outside)
    names = list(_all_tensors_from(outside))
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "../elsewhere.safetensors" for n in names}})
    )
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        HFReader(src)


def _all_tensors_from(file):
    return load_file(file)


def test_missing_shard_and_missing_config(hf_factory, tmp_path):
    cfg = get("llama-tiny").config
    out = save_hf(cfg, random_canonical(cfg, 0), tmp_path / "sharded", max_shard_bytes=100_000)
    next(out.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing model-00002"):
        HFReader(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        HFReader(tmp_path / "empty")


def test_shape_mismatch_is_reported(hf_factory, tmp_path):
    src = hf_factory(CONFIGS["llama3-scaled"])
    cfg_json = json.loads((src / "config.json").read_text())
    cfg_json["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(CheckpointError, match="has shape .* but the config implies"):
        convert(open_source(src), tmp_path / "out", Target("hf"))
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_output(tmp_path):
    cfg = get("llama-tiny").config

    def exploding():
        stream = random_canonical(cfg, 0)
        yield next(stream)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_hf(cfg, exploding(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        save_hf(cfg, random_canonical(cfg, 0), tmp_path / "out")


# ---- Qwen ---------------------------------------------------------------------------------------
# config.json as the Qwen repositories publish it (transformers 4.x spelling: rope_theta, num_experts,
# the sliding-window fields present but off)
QWEN_PUBLISHED = {
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rms_norm_eps=1e-06, rope_theta=1000000.0, rope_scaling=None,
                       tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False, sliding_window=131072,
                       max_window_layers=28, attention_dropout=0.0, torch_dtype="bfloat16"),
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-06, rope_theta=1000000,
                       rope_scaling=None, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                       use_sliding_window=False, sliding_window=None, max_window_layers=28, torch_dtype="bfloat16"),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          router_aux_loss_coef=0.001, max_position_embeddings=40960, rms_norm_eps=1e-06,
                          rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False, hidden_act="silu",
                          attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=48),
}


@pytest.mark.parametrize("preset", QWEN_PUBLISHED)
def test_qwen_published_config_reads_as_its_preset_and_back(preset):
    hf = QWEN_PUBLISHED[preset]
    cfg = for_hf_config(hf).config_from_hf(hf)
    assert cfg.architecture_differences(get(preset).config) == [] and cfg.family == get(preset).config.family
    written = for_hf_config(hf).config_to_hf(cfg)  # what transformers' own config class reads back
    from transformers import AutoConfig

    theirs = AutoConfig.for_model(**written).to_dict()
    assert for_hf_config(theirs).config_from_hf(theirs).architecture_differences(cfg) == []


@pytest.mark.parametrize("preset, change, message", [
    ("qwen2.5-7b", dict(use_sliding_window=True), "turns on sliding-window attention"),
    ("qwen3-0.6b", dict(layer_types=["sliding_attention"] * 28), "turns on sliding-window attention"),
    ("qwen3-0.6b", dict(attention_bias=True), "has attention_bias true"),
    ("qwen3-30b-a3b", dict(decoder_sparse_step=0), "decoder_sparse_step must be a positive integer"),
    ("qwen3-30b-a3b", dict(mlp_only_layers=list(range(48))), "has no sparse layer"),
], ids=["sliding-window", "sliding-layer-types", "qwen3-o-bias", "sparse-step-0", "no-sparse-layer"])
def test_qwen_configs_mzoo_cannot_build_are_refused(preset, change, message):
    hf = {**QWEN_PUBLISHED[preset], **change}
    with pytest.raises(ConfigError, match=message):
        for_hf_config(hf).config_from_hf(hf)


def test_qwen_writer_refuses_what_transformers_cannot_express():
    with pytest.raises(ConfigError, match="Qwen2 in transformers needs q/k/v biases"):
        for_hf_config({"model_type": "qwen2"}).config_to_hf(get("qwen2-tiny").config.replace(add_qkv_bias=False))
    with pytest.raises(ConfigError, match="Qwen3-MoE in transformers needs no shared experts"):
        for_hf_config({"model_type": "qwen3_moe"}).config_to_hf(
            get("qwen3-moe-tiny").config.replace(**{"moe.num_shared_experts": 1}))
