"""Dropout under tensor parallelism: the residual-stream mask is the same on every TP rank (else
the ranks' copies of the hidden state would diverge) while attention dropout draws per-rank
streams; recomputation replays the same masks."""

from __future__ import annotations

import dist as D
import pytest
import torch

from mzoo.config import ModelConfig
from mzoo.layout import Layout
from mzoo.models import build_model
from mzoo.parallel.random import seed_everything
from mzoo.parallel.state import ParallelState

CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=64, hidden_dropout=0.2, attention_dropout=0.2)


def _worker(rank, world):
    """Both TP ranks hold the same query/key/value weights for their heads, so their attention
    differs only by its dropout mask; every residual dropout mask is recorded as drawn."""
    import mzoo.models.gpt as gpt

    state = ParallelState.build(Layout(tp=world))
    model = build_model(CFG, state)
    model.init_weights(seed=1)
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            qkv = layer.self_attention.linear_qkv.weight
            qkv.copy_(torch.randn(qkv.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    attention: list[torch.Tensor] = []  # each layer's core-attention output, this rank's heads
    for layer in model.decoder.layers:
        layer.self_attention.linear_proj.register_forward_pre_hook(lambda m, args: attention.append(args[0].detach()))
    residual: list[torch.Tensor] = []  # the residual-stream dropout masks, in call order
    real_dropout = gpt.hidden_dropout

    def recorded_dropout(x, p, training, state):
        out = real_dropout(x, p, training, state)
        residual.append((out == 0) & (x != 0))
        return out

    gpt.hidden_dropout = recorded_dropout
    seen = {}
    model.decoder.final_layernorm.register_forward_hook(lambda m, args, out: seen.setdefault("h", args[0].detach()))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    for rate in (0.0, CFG.attention_dropout):  # the same residual masks, attention dropout off then on
        for layer in model.decoder.layers:
            layer.self_attention.dropout = rate
        attention.clear()
        residual.clear()
        seen.clear()
        seed_everything(state.rng, 11, state.tp_rank, state.pp_rank)
        model(ids)
        if not rate:
            without_dropout = list(attention)
    return dict(h=seen["h"], residual=residual, attention=attention, without_dropout=without_dropout)


@pytest.mark.dist
def test_residual_masks_agree_and_attention_masks_differ_across_tp():
    r0, r1 = D.run(_worker, 2)
    assert torch.equal(r0["h"], r1["h"])  # identical hidden states on both TP ranks, dropout included
    # the residual stream: embedding output, then after attention and after the MLP of each layer
    assert len(r0["residual"]) == len(r1["residual"]) == 1 + 2 * CFG.num_layers
    for m0, m1 in zip(r0["residual"], r1["residual"]):
        assert 0.1 < m0.float().mean() < 0.3  # the mask drops about hidden_dropout = 0.2
        assert torch.equal(m0, m1)  # the same mask on every TP rank (the default stream)
    # attention: the same heads' inputs on both ranks, so equal outputs without attention dropout...
    for a0, a1 in zip(r0["without_dropout"], r1["without_dropout"]):
        assert torch.equal(a0, a1)
    # ...and different ones with it: each rank's heads draw from its own model-parallel stream
    assert len(r0["attention"]) == len(r1["attention"]) == CFG.num_layers
    for a0, a1, plain in zip(r0["attention"], r1["attention"], r0["without_dropout"]):
        assert not torch.equal(a0, plain)  # attention dropout is on
        assert not torch.allclose(a0, a1)


def test_dropout_is_active_in_training_only():
    model = build_model(CFG)
    model.init_weights(seed=1)
    ids = torch.randint(0, 128, (2, 8))
    model.eval()
    a, b = model(ids), model(ids)
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(ids), a)
