"""Activation recomputation as Megatron's flags: selective modules (core attention, the MLP, the
MoE block) and full recomputation of the first N layers give the same training, keep less for
backward, and count MoE tokens once (the aux-loss-free bias update sees each token one time)."""

from __future__ import annotations

import pytest
import torch

from mzoo.models import build_chunks
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer
from mzoo.zoo import resolve

CASES = [("none", (), None), ("selective", ("core_attn",), None), ("selective", ("mlp",), None),
         ("selective", ("moe", "mlp"), None), ("full", (), None), ("full", (), 1)]


def _train(name: str, recompute: str, modules: tuple, layers, steps: int = 4) -> dict:
    torch.manual_seed(0)
    cfg = resolve(name)
    state = ParallelState.single()
    model = build_chunks(cfg, state)
    model.init_weights(seed=2)
    from mzoo.data.gpt import MockGPTDataset

    data = MockGPTDataset(cfg.vocab_size, 32, seed=3)
    tcfg = TrainConfig(seq_len=32, micro_batch=2, global_batch=4, steps=steps, lr=3e-3, recompute=recompute,
                       recompute_modules=modules, recompute_num_layers=layers)
    trainer = Trainer(model, cfg, state, tcfg, data)
    losses = [log.loss for log in trainer.train()]
    biases = [p.detach().clone() for n, p in model.canonical_parameters() if n.endswith("expert_bias")]
    return {"losses": losses, "biases": biases}


@pytest.mark.parametrize("name", ["deepseek-tiny", "mamba-hybrid-tiny"])
def test_every_recompute_setting_trains_the_same(name):
    reference = _train(name, "none", (), None)
    for recompute, modules, layers in CASES[1:]:
        got = _train(name, recompute, modules, layers)
        assert got["losses"] == pytest.approx(reference["losses"], abs=1e-6), (recompute, modules, layers)
        for a, b in zip(got["biases"], reference["biases"]):  # tokens counted once under recomputation
            assert torch.equal(a, b), (recompute, modules, layers)


def _saved(name: str, recompute: str, modules: tuple = (), layers=None) -> int:
    """Bytes autograd keeps outside checkpointed regions for one training forward of 2 x 64 tokens."""
    cfg = resolve(name).replace(num_layers=4)
    model = build_chunks(cfg, ParallelState.single())
    model.init_weights(seed=1)
    model.set_recompute(recompute, modules, layers)
    model.train()
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model[0](ids[:, :-1], labels=ids[:, 1:])
    return sum(seen.values())


def test_recomputation_keeps_less():
    none = _saved("llama-tiny", "none")
    mlp = _saved("llama-tiny", "selective", ("mlp",))
    both = _saved("llama-tiny", "selective", ("mlp", "core_attn"))
    one_layer, every_layer = _saved("llama-tiny", "full", (), 1), _saved("llama-tiny", "full")
    assert both < mlp < none
    assert every_layer < one_layer < none
    assert _saved("mixtral-tiny", "selective", ("moe",)) < _saved("mixtral-tiny", "none")


def test_unknown_modules_are_one_sentence():
    model = build_chunks(resolve("llama-tiny"), ParallelState.single(), device="meta")
    with pytest.raises(ValueError, match="unknown recompute module layernorm; use core_attn, mlp, moe"):
        model.set_recompute("selective", ("layernorm",))


@pytest.mark.parametrize("recompute, modules", [("full", ()), ("selective", ("moe",))])
def test_recomputed_moe_counts_each_token_once(recompute, modules):
    """The aux-loss-free bias update reads the routers' token counts: recomputation in backward must
    not count the micro-batch a second time (its sign-based update would hide it; the counts do not)."""
    cfg = resolve("deepseek-tiny")
    model = build_chunks(cfg, ParallelState.single())
    model.init_weights(seed=1)
    model.set_recompute(recompute, modules)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    model[0](ids[:, :-1], labels=ids[:, 1:]).sum().backward()
    routers = [m for m in model.modules() if getattr(m, "tokens_per_expert", None) is not None]
    assert routers
    for router in routers:
        assert router.tokens_per_expert.sum().item() == 2 * 32 * cfg.moe.top_k
