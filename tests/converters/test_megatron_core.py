"""Real megatron-core (0.16.1, local spec, CPU shim in tests/) reads what mzoo writes, and mzoo
reads what megatron-core writes; logits are held to transformers' own."""

from __future__ import annotations

import dist as D
import mcore_ref as R
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout

pytestmark = pytest.mark.dist

HF_CONFIG = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128)
IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
PADDED = 1024  # 1000 padded to a multiple of 128 (x TP 1 or 2)


def _load_dist(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=world, padded_vocab=PADDED)
    R.load_dist_checkpoint(model, path)  # Megatron-LM's default strictness
    return R.pack(R.logits(model, ids))


def _load_legacy(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=world, padded_vocab=PADDED)
    state = torch.load(path / "iter_0000000" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt", weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    return R.pack(R.logits(model, ids))


def _save_mcore(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=world, padded_vocab=PADDED)
    R.perturb_(model)
    args = R.megatron_args(cfg, world, PADDED)
    R.save_dist_checkpoint(model, path / "iter_0000003", args=args, iteration=3)
    if rank == 0:
        (path / "latest_checkpointed_iteration.txt").write_text("3")
    return R.pack(R.logits(model, ids))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from conftest import make_hf_model

    path = make_hf_model(tmp_path_factory.mktemp("hf") / "llama", HF_CONFIG)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits
    return path, expected


def test_megatron_core_loads_mzoo_torch_dist_at_another_tp(hf, tmp_path):
    path, expected = hf
    out = tmp_path / "mc"
    convert(open_source(path), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=1), spelling="local")))
    cfg = open_source(out).cfg
    for logits in map(R.unpack, D.run(_load_dist, 2, cfg, out / "iter_0000000", IDS)):  # written TP1, read TP2
        assert (logits[..., :1000] - expected).abs().max().item() <= 1e-4


def test_megatron_core_loads_mzoo_legacy_rank_files(hf, tmp_path):
    path, expected = hf
    out = tmp_path / "legacy"
    convert(open_source(path), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2), spelling="local")))
    cfg = open_source(out).cfg
    for logits in map(R.unpack, D.run(_load_legacy, 2, cfg, out, IDS)):
        assert (logits[..., :1000] - expected).abs().max().item() <= 1e-4


def test_megatron_core_checkpoint_converts_to_hf(hf, tmp_path):
    path, _ = hf
    cfg = open_source(path).cfg
    ck = tmp_path / "mcore"
    mcore_logits = R.unpack(D.run(_save_mcore, 2, cfg, ck, IDS)[0])  # megatron-core writes at TP2
    out = tmp_path / "hf"
    convert(open_source(ck, vocab_size=1000), out, Target("hf"))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(IDS).logits
    assert (got - mcore_logits[..., :1000]).abs().max().item() <= 1e-4
