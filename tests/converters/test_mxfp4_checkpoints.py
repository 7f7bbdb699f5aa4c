"""An MXFP4 checkpoint through the whole read path (open_source, convert, inspect), with no GPT-OSS
adapter needed: a tiny Mixtral saved in transformers 5's fused expert spelling, its experts stored as
GPT-OSS stores them (`*_blocks` + `*_scales`, quantization_config mxfp4), reads exactly like the same
checkpoint holding the dequantised bf16 experts, and converts to a plain bf16 checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from conftest import all_safetensors
from informative import perturb_hf_
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig

from mzoo.ckpt.hf import HFReader
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.ckpt.mxfp4 import dequantize, quantize
from mzoo.converters import for_hf_config
from mzoo.converters.mapping import Direct, MappingTable
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.models.canonical import canonical_tensors

# 2F = 96 and H = 32: both expert tensors' dim 1 is a multiple of the 32-value MXFP4 block
CONFIG = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=64)
MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.gate",
                                                            "model.embed_tokens", "lm_head"]}


def _save(folder: Path, state: dict[str, torch.Tensor], quantization: dict | None) -> Path:
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**CONFIG.to_dict(), "dtype": "bfloat16"}
    if quantization:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    """The same bf16 model twice: experts stored MXFP4, and stored as their dequantised values."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32)
    perturb_hf_(model, moe=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    packed, plain = {}, {}
    for name, value in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize(value)
            packed |= {name + "_blocks": blocks, name + "_scales": scales}
            plain[name] = dequantize(blocks, scales)
        else:
            packed[name] = plain[name] = value
    assert sum(n.endswith("_blocks") for n in packed) == 4
    return _save(tmp_path / "mxfp4", packed, MXFP4), _save(tmp_path / "bf16", plain, None)


def test_mxfp4_experts_read_convert_and_inspect_as_bf16(tmp_path, monkeypatch):
    quantised, plain = _pair(tmp_path)
    q, p = open_source(quantised), open_source(plain)
    assert (q.quantization, p.quantization) == ("mxfp4", None)
    assert q.cfg == p.cfg and q.dtype == p.dtype == torch.bfloat16
    experts = [t.name for t in q.tensors if ".local_experts." in t.name]
    assert len(experts) == 2 * 4 * 2
    for t in q.tensors:  # experts one row at a time: only that expert's blocks and scales are read
        assert torch.equal(q.get(t.name), p.get(t.name)), t.name

    # export writes bf16 and no quantization_config, the same files as converting the bf16 copy
    convert(q, tmp_path / "out_q", Target("hf"))
    convert(p, tmp_path / "out_p", Target("hf"))
    written = json.loads((tmp_path / "out_q" / "config.json").read_text())
    assert "quantization_config" not in written and written["dtype"] == "bfloat16"
    out = HFReader(tmp_path / "out_q")
    assert out.quantization is None and not any(n.endswith(("_blocks", "_scales")) for n in out.names())
    ours, theirs = all_safetensors(tmp_path / "out_q"), all_safetensors(tmp_path / "out_p")
    assert ours.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    # ... and a Megatron checkpoint, whose writer copies plain tensors by extents and reads the rest
    convert(q, tmp_path / "mc_q", Target("torch_dist"))
    convert(p, tmp_path / "mc_p", Target("torch_dist"))
    back_q, back_p = open_source(tmp_path / "mc_q"), open_source(tmp_path / "mc_p")
    assert all(torch.equal(back_q.get(n), back_p.get(n)) for n in experts)

    # inspect says what is stored and counts the dequantised parameters
    from typer.testing import CliRunner

    from mzoo.cli.main import app
    from mzoo.jobs.inspect import describe

    info_q, info_p = describe(quantised), describe(plain)
    assert info_q["quantization"] == "mxfp4" and info_p["quantization"] is None
    assert info_q["num_params"] == info_p["num_params"] == sum(v.numel() for v in theirs.values())
    shown = CliRunner().invoke(app, ["inspect", str(quantised)])
    assert shown.exit_code == 0 and "stored MXFP4, read dequantized" in shown.stdout, shown.stdout
    # push uploads the folder as it is, and its card says so
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    shown = CliRunner().invoke(app, ["push", str(quantised), "my-org/tiny-mxfp4", "--dry-run"])
    assert shown.exit_code == 0 and "stored as bfloat16 and MXFP4 safetensors" in shown.stdout, shown.stdout


def test_a_whole_mxfp4_tensor_is_read_not_copied(tmp_path):
    """A mapping of the whole stored tensor (as GPT-OSS's adapter maps gate_up_proj) gets no extents:
    the bytes on disk are blocks and scales, so the converter must read, and so dequantise, it."""
    quantised, plain = _pair(tmp_path)
    reader, bf16 = HFReader(quantised), HFReader(plain)
    name = "model.layers.1.mlp.experts.down_proj"
    canonical = "decoder.layers.1.mlp.experts.whole_fc2"
    base = for_hf_config(reader.config)
    adapter = dataclasses.replace(base, table=MappingTable([Direct(canonical, name)]))
    cfg = base.config_from_hf(reader.config)
    assert adapter.extents(canonical, reader, cfg) is None and adapter.extents(canonical, bf16, cfg) is not None
    assert torch.equal(adapter.to_canonical(canonical, reader.get, cfg), bf16.get(name))
    assert len(canonical_tensors(cfg)) == len(open_source(quantised).tensors)


def _gpt_oss_mxfp4(tmp_path: Path, config, seed: int) -> Path:
    """A tiny GPT-OSS saved as the published checkpoints are: experts ([E, H, 2F] gate_up_proj and
    [E, F, H] down_proj) as MXFP4 blocks + scales, the rest bf16."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    perturb_hf_(model, moe=True)
    stored = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name + "_blocks"], stored[name + "_scales"] = quantize(value.contiguous())
        else:
            stored[name] = value.contiguous()
    folder = tmp_path / "gpt-oss"
    folder.mkdir()
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "quantization_config": MXFP4}))
    return folder


def test_transformers_loads_what_the_reader_reads_from_a_gpt_oss_mxfp4_folder(tmp_path):
    """A tiny GPT-OSS saved as the published checkpoints are (experts MXFP4, the rest bf16): transformers'
    own loader (dequantize=True, its CPU path) holds exactly the tensors HFReader presents, names included."""
    from transformers import GptOssConfig, Mxfp4Config

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64,
                          layer_types=["sliding_attention", "full_attention"])
    folder = _gpt_oss_mxfp4(tmp_path, config, seed=4)
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.bfloat16).state_dict()
    reader = HFReader(folder)
    assert sorted(reader.names()) == sorted(loaded)
    assert sum(reader.shape(n) == (4, 64, 64) and reader.dtype(n) == "BF16" for n in reader.names()) == 2
    for name in reader.names():
        assert torch.equal(reader.get(name), loaded[name]), name


def test_gpt_oss_stored_mxfp4_runs_and_converts_as_transformers_dequantises_it(tmp_path):
    """The published GPT-OSS layout end to end, with F != H so a transposed down_proj cannot pass: mzoo's
    model built from the MXFP4 folder gives the logits of transformers' own dequantising loader
    (fp32), and hf -> megatron (TP2 EP2, torch_dist) -> hf writes plain bf16 experts equal to them."""
    from transformers import GptOssConfig, Mxfp4Config

    from mzoo.converters.hf import load_hf_model
    from mzoo.layout import Layout
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"])
    folder = _gpt_oss_mxfp4(tmp_path, config, seed=5)  # experts [E, 64, 64] and [E, 32, 64]
    theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32).eval()
    assert theirs.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 64)  # [E, F, H]: F != H
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    _, ours = load_hf_model(folder)
    with torch.no_grad():
        assert (ours.eval()(ids) - theirs(ids).logits).abs().max() <= 1e-4
    lay = MegatronCheckpoint(layout=Layout(tp=2, ep=2))
    convert(open_source(folder), tmp_path / "mc", Target("torch_dist", lay))
    convert(open_source(tmp_path / "mc"), tmp_path / "back", Target("hf"))
    back = HFReader(tmp_path / "back")
    assert back.quantization is None and "quantization_config" not in back.config
    reader = HFReader(folder)
    assert sorted(back.names()) == sorted(reader.names())
    for name in reader.names():
        assert torch.equal(back.get(name), reader.get(name)), name
