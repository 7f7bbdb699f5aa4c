"""Checkpoints that Megatron-Bridge 0.6.2 itself wrote (tests/fixtures/bridge-0.6.2, made by its
make.py from the `<family>-hf` folders beside them) convert to Hugging Face exactly: every tensor
equal to the source's, the same logits in transformers, Bridge's tokenizer carried with the
special ids it names. Bridge saves run_config.yaml (its model provider) and no Megatron-LM args."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import all_safetensors
from mzoo.ckpt.assets import tokenizer_ids
from mzoo.jobs.convert import ConvertRequest, run
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bridge-0.6.2"
CASES = {  # checkpoint: (its HF source, family, layout)
    "llama": ("llama-hf", "llama", Layout(tp=1)),
    "llama-tp2": ("llama-hf", "llama", Layout(tp=2)),
    "gpt": ("gpt-hf", "gpt", Layout(tp=1)),
    "mixtral": ("mixtral-hf", "mixtral", Layout(tp=1)),
    "deepseek_v3": ("deepseek_v3-hf", "deepseek", Layout(tp=1)),
    "nemotron_h": ("nemotron_h-hf", "mamba", Layout(tp=1)),
}


@pytest.mark.parametrize("name", CASES)
def test_bridge_checkpoint_converts_to_hf_exactly(name, tmp_path):
    hf_name, family, layout = CASES[name]
    root, source = FIXTURES / name, FIXTURES / hf_name
    src = open_source(root)
    assert not any(root.rglob("common.pt")) and src.cfg.family == family and src.megatron.layout == layout
    out = tmp_path / "hf"
    run(ConvertRequest(src=root, dst=out, to="hf", expect="megatron"))
    theirs, ours = all_safetensors(source), all_safetensors(out)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key

    tokenizer = root / "iter_0000000" / "tokenizer"
    for f in tokenizer.iterdir():  # Bridge's tokenizer travels; the ids are the ones it names
        assert (out / f.name).read_bytes() == f.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in tokenizer_ids(tokenizer)} == tokenizer_ids(tokenizer)

    if family == "mamba":  # same tensors; its forward (the torch path) is slow and adds nothing
        return
    ids = torch.randint(0, src.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert (got - want).abs().max().item() <= 1e-6
