"""Context parallelism on real gloo ranks: CP2 alone and composed with TP (+SP), PP, DP (distributed
optimizer) and EP, GPT-OSS's sinks and sliding windows under CP2, and Qwen3-MoE's per-head q/k norms
(their gradients summed over CP and TP) under CP2 x TP2 + SP, give the loss curve of one process
training the same model on the same global batches, step for step (fp32, 20 steps, 1e-5); the model's norms are informative (not all ones)."""

from __future__ import annotations

import dist as D
import pytest
import torch
from informative import noise
from test_moe_training import DEEPSEEK, GPT_OSS, MIXTRAL, QWEN3_MOE
from test_training_parity import CFG, counting_sampler

from mzoo.config import ConfigError, ModelConfig
from mzoo.layout import Layout
from mzoo.models import build_chunks
from mzoo.models.gpt import _global_shape
from mzoo.parallel.sharding import to_local
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer
from mzoo.zoo import get

STEPS = 20
SEQ = 16
MODELS = {"llama": CFG.replace(num_layers=4), "mixtral": MIXTRAL, "deepseek": DEEPSEEK,
          "gpt-oss": GPT_OSS.replace(hidden_size=64),  # learns 0.3 in 20 steps
          "qwen3-moe": QWEN3_MOE}


@torch.no_grad()
def _informative(model: torch.nn.Module, cfg: ModelConfig, state: ParallelState) -> None:
    """Move every 1-D parameter (norms, biases) by the same global noise in every layout."""
    for chunk in model:
        for name, p in chunk.canonical_parameters():
            if p.dim() == 1 and p.requires_grad:
                value = noise(name, _global_shape(p, state, cfg.vocab_size))
                p.add_(to_local(p, value, state.tp, state.tp_rank).to(p.dtype))


def _train(name: str, state: ParallelState, distributed_optimizer: bool = False) -> list[float]:
    cfg = MODELS[name]
    tcfg = TrainConfig(seq_len=SEQ, micro_batch=2, global_batch=8, steps=STEPS, lr=3e-3, min_lr=3e-4, warmup=2,
                       distributed_optimizer=distributed_optimizer)
    model = build_chunks(cfg, state)
    model.init_weights(seed=5)
    _informative(model, cfg, state)
    trainer = Trainer(model, cfg, state, tcfg, counting_sampler(cfg.vocab_size, SEQ))
    return [log.loss for log in trainer.train()]


def _worker(rank, world, name, layout, distributed_optimizer):
    torch.manual_seed(0)
    return _train(name, ParallelState.build(Layout(**layout)), distributed_optimizer)


@pytest.fixture(scope="module")
def reference() -> dict[str, list[float]]:
    torch.set_num_threads(1)
    return {}


def _expected(reference: dict, name: str) -> list[float]:
    if name not in reference:
        reference[name] = _train(name, ParallelState.single())
        assert reference[name][-1] < reference[name][0] - 0.3  # it learns: the curve says something
    return reference[name]


@pytest.mark.dist
@pytest.mark.parametrize(
    "name, layout, world, dist_opt",
    [
        ("llama", dict(cp=2), 2, False),
        ("llama", dict(cp=2, tp=2), 4, False),
        ("llama", dict(cp=2, tp=2, sequence_parallel=True), 4, False),
        ("llama", dict(cp=2, pp=2), 4, False),
        ("llama", dict(cp=2, dp=2), 4, True),
        ("mixtral", dict(cp=2, ep=2), 2, True),
        ("deepseek", dict(cp=2), 2, False),
        ("gpt-oss", dict(cp=2), 2, False),
        ("qwen3-moe", dict(cp=2, tp=2, sequence_parallel=True), 4, False),
    ],
    ids=["cp2", "cp2xtp2", "cp2xtp2-sp", "cp2xpp2", "cp2xdp2-distopt", "mixtral-cp2xep2-distopt", "deepseek-mla-cp2",
         "gpt-oss-sinks-window-cp2", "qwen3-moe-qknorm-cp2xtp2-sp"],
)
def test_cp_loss_curve_matches_single_process(reference, name, layout, world, dist_opt):
    expected = _expected(reference, name)
    for losses in D.run(_worker, world, name, layout, dist_opt):
        diffs = [abs(a - b) for a, b in zip(losses, expected)]
        assert len(diffs) == STEPS and max(diffs) <= 1e-5, diffs


@pytest.mark.parametrize(
    "layout, seq, words",
    [
        (Layout(cp=3), 16, "not divisible by 2 x cp = 6"),
        (Layout(cp=2, tp=4, sequence_parallel=True), 20, "--seq-len 20 / cp 2 is not divisible by TP=4"),
    ],
)
def test_sequences_that_do_not_split_are_one_sentence(layout, seq, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(seq_len=seq).validate(ParallelState.single(layout))


def test_cp_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="attention dropout"):
        Layout(cp=2).validate_for(CFG.replace(attention_dropout=0.1))
    with pytest.raises(ConfigError, match="Mamba layers"):
        Layout(cp=2).validate_for(get("mamba-hybrid-tiny").config)
