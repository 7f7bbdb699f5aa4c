"""Overlapped data-parallel reductions and parameter all-gathers (issue 18): on real gloo ranks, a
run with overlap equals the same run without it bitwise (losses and final weights), every gradient
bucket is reduced exactly once per step, and most of them start inside the backward (a run that
silently fell back to reducing in `step` would fail). Layouts cover the cases where a bucket is
easy to miss or reduce twice: tied embeddings across pipeline stages (their bucket waits for the
copies to be summed), sequence-parallel norms (summed over TP first), expert parameters with
their own group, the interleaved schedule, and context parallelism (dense gradients over dp x cp)."""

from __future__ import annotations

import dist as D
import pytest
import torch

from mzoo.config import ConfigError, ModelConfig, MoEConfig
from mzoo.layout import Layout
from mzoo.models import build_chunks
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer
from test_training_parity import counting_sampler

LLAMA = ModelConfig(family="llama", vocab_size=250, hidden_size=32, num_layers=4, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=64)
MODELS = {
    "llama": LLAMA,
    "llama-tied": LLAMA.replace(tie_embeddings=True),
    "mixtral": ModelConfig(family="mixtral", vocab_size=250, hidden_size=32, num_layers=2, num_attention_heads=4,
                           num_query_groups=2, ffn_hidden_size=48, max_position_embeddings=64,
                           moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=48, aux_loss_coeff=1e-2)),
}
STEPS = 6


def _run(name: str, state: ParallelState, dist_opt: bool, overlap: bool) -> dict:
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=16, steps=STEPS, lr=3e-3, min_lr=3e-4, warmup=2,
                       distributed_optimizer=dist_opt, overlap_grad_reduce=overlap,
                       overlap_param_gather=overlap and dist_opt, bucket_elements=3000)
    cfg = MODELS[name]
    model = build_chunks(cfg, state)
    model.init_weights(seed=5)
    trainer = Trainer(model, cfg, state, tcfg, counting_sampler(cfg.vocab_size, tcfg.seq_len))
    per_step = []

    def record(_log) -> None:
        groups = [group for group, _ in trainer.optimizer.groups if group.overlap]  # size-1 groups reduce nothing
        per_step.append([(b.launches, b.in_backward, b.deferred) for g in groups for b in g.buckets])

    losses = [log.loss for log in trainer.train(on_step=record)]
    weights = {n: p.detach().clone() for n, p in model.canonical_parameters()}
    return {"losses": losses, "weights": weights, "buckets": per_step}


def _worker(rank, world, name, layout, dist_opt):
    torch.manual_seed(0)
    state = ParallelState.build(Layout(**layout))
    return _run(name, state, dist_opt, False), _run(name, state, dist_opt, True)


@pytest.mark.dist
@pytest.mark.parametrize(
    "name, layout, world, dist_opt",
    [
        ("llama", dict(dp=2), 2, False),
        ("llama", dict(dp=2), 2, True),
        ("llama", dict(tp=2, dp=2, sequence_parallel=True), 4, True),
        ("llama-tied", dict(pp=2, dp=2), 4, True),
        ("llama", dict(pp=2, vpp=2, dp=2), 4, True),
        ("mixtral", dict(dp=2, ep=2), 2, True),
        ("llama", dict(cp=2), 2, True),
    ],
    ids=["dp2", "dp2-distopt", "tp2-sp-dp2-distopt", "pp2-tied-dp2-distopt", "pp2-vpp2-dp2-distopt",
         "mixtral-ep2-distopt", "cp2-distopt"],
)
def test_overlap_equals_the_plain_run_bitwise(name, layout, world, dist_opt):
    for rank, (plain, overlapped) in enumerate(D.run(_worker, world, name, layout, dist_opt)):
        assert overlapped["losses"] == plain["losses"], (rank, plain["losses"], overlapped["losses"])
        for key, value in plain["weights"].items():
            assert torch.equal(overlapped["weights"][key], value), (rank, key)
        for step, buckets in enumerate(overlapped["buckets"]):
            assert len(buckets) > 2, buckets  # small buckets: several per group
            assert all(launches == 1 for launches, _, _ in buckets), (rank, step, buckets)
            early = [inside for _, inside, deferred in buckets if not deferred]
            assert sum(early) >= len(early) - 1, (rank, step, buckets)  # all but the last one in the backward
            assert all(inside == 0 for _, inside, deferred in buckets if deferred)


def test_param_gather_overlap_needs_the_distributed_optimizer():
    with pytest.raises(ConfigError, match="--overlap-param-gather overlaps the distributed optimizer's all-gather"):
        TrainConfig(overlap_param_gather=True).validate_choices()
