"""Checkpoints that megatron-core 0.19.2 itself saved (tests/fixtures/mcore-0.19.2, made by its
make.py in a Python 3.12 venv) convert to Hugging Face with megatron-core's own logits, and back to
torch_dist tensor for tensor equal to what megatron-core wrote. megatron-core >= 0.17 keeps the
common state (args, iteration) as a DCP object, `common_state/shard_0_1`, instead of common.pt."""

from __future__ import annotations

from pathlib import Path

import mcore_ref as R
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
from mzoo.jobs.convert import convert
from mzoo.jobs.inspect import describe
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mcore-0.19.2"
VOCAB = 250
CASES = {  # name: (family, layout it was saved at)
    "llama-tp1": ("llama", Layout(tp=1)),
    "llama-tp2": ("llama", Layout(tp=2)),
    "llama-pp2": ("llama", Layout(pp=2)),
    "gpt2-tp1": ("gpt", Layout(tp=1)),
    "moe-ep2": ("mixtral", Layout(ep=2)),
}


@pytest.mark.parametrize("name", CASES)
def test_reads_what_megatron_core_0_19_saved(name, tmp_path):
    family, layout = CASES[name]
    root = FIXTURES / name
    assert not list(root.rglob("common.pt"))  # the common state really is the in-DCP object
    source = open_source(root)
    assert source.cfg.family == family and source.cfg.vocab_size == VOCAB
    assert source.megatron.layout == layout and source.megatron.iteration == 2
    info = describe(root)
    assert info["iteration"] == 2

    hf = tmp_path / "hf"
    convert(source, hf, Target("hf"))
    expected = load_file(str(root / "expected.safetensors"))
    with torch.no_grad():  # megatron-core's own forward when it saved
        got = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(expected["ids"]).logits
    assert (got - expected["logits"]).abs().max().item() <= 1e-5

    back = tmp_path / "back"
    convert(open_source(hf), back, Target("torch_dist", MegatronCheckpoint(layout=layout, spelling=source.megatron.spelling)))
    theirs = R.read_dcp_tensors(root / "iter_0000002")
    ours = R.read_dcp_tensors(back / "release")
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        mine = ours[key]
        if mine.shape != tensor.shape or "word_embeddings" in key or "output_layer" in key:  # padded vocab rows
            tensor, mine = tensor[..., :VOCAB, :], mine[..., :VOCAB, :]
        assert torch.equal(mine, tensor), key
