"""MXFP4 (GPT-OSS experts): dequantisation equal to transformers', its inverse, and HFReader presenting
each `X_blocks` + `X_scales` pair as one bf16 tensor `X` (and refusing broken pairs in one sentence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzoo.ckpt.hf import CheckpointError, HFReader
from mzoo.ckpt.mxfp4 import FP4_VALUES, dequantize, quantize

EXPERTS = "model.layers.0.mlp.experts."
MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}


def _random_pair(experts: int, rows: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (experts, rows, groups), dtype=torch.uint8, generator=g)
    scales[0, 0, 0], scales[-1, -1, -1] = 0, 254  # the extreme exponents, 2^-127 and 2^127
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_is_transformers_convert_moe_packed_tensors(dtype):
    from transformers.integrations.mxfp4 import FP4_VALUES as TF_VALUES
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # pure torch: runs on CPU

    assert tuple(TF_VALUES) == FP4_VALUES
    blocks, scales = _random_pair(3, 5, 4)
    ours = dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
    assert ours.shape == theirs.shape == (3, 4 * 32, 5) and ours.dtype == dtype
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(ours.view(bits), theirs.view(bits))  # bit for bit, signed zeros included


def test_layout_nibble_order_and_scale_bias():
    """One block spelled out: low nibble first, code 8+ negative, value * 2^(scale - 127), row r -> [:, r]."""
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 1, 0, 0] = 0x72  # low nibble 2 (1.0), high nibble 7 (6.0)
    blocks[0, 1, 0, 1] = 0xD9  # low 9 (-0.5), high 13 (-3.0)
    scales = torch.tensor([[[127], [129]]], dtype=torch.uint8)
    out = dequantize(blocks, scales)
    assert out.shape == (1, 32, 2)
    assert out[0, :4, 1].tolist() == [4.0, 24.0, -2.0, -12.0] and not out[0, 4:, 1].any() and not out[0, :, 0].any()


def test_quantize_inverts_dequantize_and_rounds_to_nearest_even():
    # values that MXFP4 holds exactly: an e2m1 code times a power of two per block of 32
    g = torch.Generator().manual_seed(1)
    codes = torch.tensor(FP4_VALUES)[torch.randint(0, 16, (2, 64, 3), generator=g)]
    power = torch.exp2(torch.randint(-20, 20, (2, 2, 3), generator=g).float()).repeat_interleave(32, dim=1)
    exact = (codes * power).to(torch.bfloat16)
    blocks, scales = quantize(exact)
    assert blocks.shape == (2, 3, 2, 16) and scales.shape == (2, 3, 2) and blocks.dtype == scales.dtype == torch.uint8
    assert torch.equal(dequantize(blocks, scales), exact)
    again = quantize(dequantize(blocks, scales))
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)
    # anything else: the block's scale makes its largest magnitude fit 6, each value goes to the nearest
    # code, a midpoint to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4)
    row = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.1, 0.3, -0.7, 2.9] + [0.0] * 20)
    got = dequantize(*quantize(row.view(1, 32, 1))).view(32)
    assert got[:12].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0, 0.5, -0.5, 3.0]
    assert got[12:].eq(0).all()
    assert torch.equal(dequantize(*quantize(row.view(1, 32, 1) * 2.0**-30)), got.view(1, 32, 1) * 2.0**-30)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.ones(1, 48, 2))


def _folder(path: Path, tensors: dict[str, torch.Tensor], quantization: object = MXFP4) -> Path:
    path.mkdir()
    config = {"model_type": "gpt_oss", "num_hidden_layers": 1}
    if quantization is not None:
        config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def _gpt_oss_like(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPT-OSS's stored spelling for one layer's experts: gate_up_proj as blocks/scales, its bias plain."""
    blocks, scales = _random_pair(2, 6, 2, seed)
    tensors = {EXPERTS + "gate_up_proj_blocks": blocks, EXPERTS + "gate_up_proj_scales": scales,
               EXPERTS + "gate_up_proj_bias": torch.randn(2, 6).to(torch.bfloat16),
               "model.norm.weight": torch.rand(64).to(torch.bfloat16) + 0.5}
    return tensors, dequantize(blocks, scales)


def test_reader_presents_each_pair_as_one_bf16_tensor(tmp_path):
    tensors, want = _gpt_oss_like()
    lone = "model.layers.0.layer_scales"  # a float `*_scales` without blocks is an ordinary weight
    reader = HFReader(_folder(tmp_path / "q", {**tensors, lone: torch.rand(4).to(torch.bfloat16)}))
    name = EXPERTS + "gate_up_proj"
    assert reader.quantization == "mxfp4"
    assert sorted(reader.names()) == sorted([name, EXPERTS + "gate_up_proj_bias", "model.norm.weight", lone])
    assert name in reader and EXPERTS + "gate_up_proj_blocks" not in reader and EXPERTS + "gate_up_proj_scales" \
        not in reader
    assert reader.shape(name) == (2, 64, 6) and reader.dtype(name) == "BF16" and reader.torch_dtype(name) == torch.bfloat16
    assert reader.nbytes(name) == 2 * 64 * 6 * 2
    assert torch.equal(reader.get(name), want) and reader.get(name).dtype == torch.bfloat16
    assert torch.equal(reader.get_row(name, 1), want[1])  # one expert's blocks and scales only
    assert reader.extents(name) is None  # no bytes to copy: callers read (and so dequantise) it
    assert reader.extents("model.norm.weight") is not None
    assert torch.equal(reader.get("model.norm.weight"), tensors["model.norm.weight"])
    with pytest.raises(CheckpointError, match="has no tensor .*gate_up_proj_blocks"):
        reader.get(EXPERTS + "gate_up_proj_blocks")
    with pytest.raises(CheckpointError, match="no row 2"):
        reader.get_row(name, 2)


def _one_sentence(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text
    return text


def _drop(name: str):
    return lambda t: {k: v for k, v in t.items() if k != EXPERTS + name}


def _replace(name: str, value):
    return lambda t: {**t, EXPERTS + name: value(t[EXPERTS + name])}


BROKEN = {
    "blocks without scales": (_drop("gate_up_proj_scales"), MXFP4, r"gate_up_proj_blocks but no .*gate_up_proj_scales"),
    "scales without blocks": (_drop("gate_up_proj_blocks"), MXFP4, r"gate_up_proj_scales but no .*gate_up_proj_blocks"),
    "scales of another shape": (_replace("gate_up_proj_scales", lambda s: s[:, :5]), MXFP4,
                                r"gate_up_proj_blocks \(2, 6, 2, 16\) and .*_scales \(2, 5, 2\)"),
    "blocks not 16 bytes": (_replace("gate_up_proj_blocks", lambda b: b[..., :8]), MXFP4,
                            r"gate_up_proj_blocks \(2, 6, 2, 8\)"),
    "3-d blocks": (lambda t: _replace("gate_up_proj_blocks", lambda b: b[0])(_replace(
        "gate_up_proj_scales", lambda s: s[0])(t)), MXFP4, r"gate_up_proj_blocks \(6, 2, 16\)"),
    "blocks not uint8": (_replace("gate_up_proj_blocks", lambda b: b.to(torch.int16)), MXFP4,
                         r"gate_up_proj_blocks as I16"),
    "plain and packed": (lambda t: {**t, EXPERTS + "gate_up_proj": torch.zeros(2, 64, 6)}, MXFP4,
                         r"gate_up_proj both plain and as MXFP4"),
    "gptq": (lambda t: t, {"quant_method": "gptq", "bits": 4}, r"quant_method is 'gptq'.*dequantize"),
    "fp8": (lambda t: t, {"quant_method": "fp8", "weight_block_size": [128, 128]}, r"quant_method is 'fp8'"),
    "no quant_method": (lambda t: t, {"bits": 4}, r"quantization_config without a quant_method"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_quantised_checkpoints_are_refused_at_open(tmp_path, case):
    edit, quantization, match = BROKEN[case]
    tensors, _ = _gpt_oss_like()
    with pytest.raises(CheckpointError, match=match) as e:
        HFReader(_folder(tmp_path / "q", edit(tensors), quantization))
    _one_sentence(e)


def test_pair_without_quantization_config_says_so(tmp_path):
    tensors, _ = _gpt_oss_like()
    reader = HFReader(_folder(tmp_path / "q", tensors, quantization=None))
    assert reader.quantization is None and EXPERTS + "gate_up_proj_blocks" in reader  # read as they are
    with pytest.raises(CheckpointError, match="stored as MXFP4 .*no quantization_config") as e:
        reader.get(EXPERTS + "gate_up_proj")
    _one_sentence(e)


def test_halves_in_different_shards(tmp_path):
    """A sharded checkpoint may put a tensor's blocks and its scales in different files."""
    tensors, want = _gpt_oss_like(seed=2)
    folder = _folder(tmp_path / "q", {k: v for k, v in tensors.items() if not k.endswith("_scales")})
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    scales = EXPERTS + "gate_up_proj_scales"
    save_file({scales: tensors[scales]}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors if k != scales}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**weight_map, scales: "model-00002-of-00002.safetensors"}}))
    reader = HFReader(folder)
    assert torch.equal(reader.get(EXPERTS + "gate_up_proj"), want)
    assert torch.equal(reader.get_row(EXPERTS + "gate_up_proj", 0), want[0])
