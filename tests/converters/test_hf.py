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


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny"])
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
