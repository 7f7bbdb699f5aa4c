"""Dropout under tensor parallelism: the residual-stream mask is the same on every TP rank (else
the ranks' copies of the hidden state would diverge) while attention dropout draws per-rank
streams; recomputation replays the same masks."""

from __future__ import annotations

import pytest
import torch

import dist as D
from mzoo.config import ModelConfig, ParallelConfig
from mzoo.models import build_model
from mzoo.parallel.random import MODEL_PARALLEL, seed_everything
from mzoo.parallel.state import ParallelState

CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=64, hidden_dropout=0.2, attention_dropout=0.2)


def _worker(rank, world):
    state = ParallelState.build(ParallelConfig(tp=world))
    model = build_model(CFG, state)
    model.init_weights(seed=1)
    seed_everything(state.rng, 11, state.tp_rank, state.pp_rank)
    stream = state.rng.states[MODEL_PARALLEL].clone()
    seen = {}
    model.decoder.final_layernorm.register_forward_hook(lambda m, args, out: seen.setdefault("h", args[0].detach()))
    model.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids)
    return seen["h"].tolist(), stream.tolist()


@pytest.mark.dist
def test_residual_masks_agree_and_attention_streams_differ_across_tp():
    (h0, s0), (h1, s1) = D.run(_worker, 2)
    assert h0 == h1  # identical hidden states on both TP ranks, dropout included
    assert s0 != s1  # attention dropout: a different stream per TP rank


def test_dropout_is_active_in_training_only():
    model = build_model(CFG)
    model.init_weights(seed=1)
    ids = torch.randint(0, 128, (2, 8))
    model.eval()
    a, b = model(ids), model(ids)
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(ids), a)
