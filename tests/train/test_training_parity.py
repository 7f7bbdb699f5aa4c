"""Loss curves of TP2, DP2 (plain and distributed optimizer) and TP2 x DP2 on real gloo ranks
equal a single-process run of the same model and global batch at every step (fp32, 1e-5); pipeline
layouts, and the Qwen2 / Qwen3 attention (q/k/v biases, q/k norms) at TP2+SP and TP2 x PP2."""

from __future__ import annotations

import dist as D
import pytest
import torch

from mzoo.config import ModelConfig
from mzoo.layout import Layout
from mzoo.models import build_model
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer

CFG = ModelConfig(family="llama", vocab_size=250, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=64)
STEPS = 20


def counting_sampler(vocab: int, seq_len: int):
    """Learnable data: runs of consecutive ids from a per-sample random start."""

    def sample(index: int) -> dict[str, torch.Tensor]:
        start = int(torch.randint(0, vocab, (1,), generator=torch.Generator().manual_seed(index)))
        ids = (torch.arange(seq_len + 1) * 3 + start) % vocab
        return {"tokens": ids[:-1], "labels": ids[1:]}

    return sample


def _train(state: ParallelState, distributed_optimizer: bool) -> list[float]:
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=STEPS, lr=3e-3, min_lr=3e-4, warmup=2,
                       distributed_optimizer=distributed_optimizer)
    model = build_model(CFG, state)
    model.init_weights(seed=5)
    trainer = Trainer(model, CFG, state, tcfg, counting_sampler(CFG.vocab_size, tcfg.seq_len))
    return [log.loss for log in trainer.train()]


def _worker(rank, world, layout, distributed_optimizer):
    torch.manual_seed(0)
    state = ParallelState.build(Layout(**layout))
    return _train(state, distributed_optimizer)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return _train(ParallelState.single(), False)


def test_single_process_learns(reference):
    assert reference[-1] < reference[0] - 0.3


@pytest.mark.dist
@pytest.mark.parametrize(
    "layout, world, dist_opt",
    [
        (dict(tp=2), 2, False),
        (dict(tp=2, sequence_parallel=True), 2, False),
        (dict(dp=2), 2, False),
        (dict(dp=2), 2, True),
        (dict(tp=2, dp=2), 4, True),
    ],
    ids=["tp2", "tp2-sp", "dp2", "dp2-distopt", "tp2xdp2-distopt"],
)
def test_loss_curve_matches_single_process(reference, layout, world, dist_opt):
    for losses in D.run(_worker, world, layout, dist_opt):
        assert len(losses) == STEPS
        diffs = [abs(a - b) for a, b in zip(losses, reference)]
        assert max(diffs) <= 1e-5, diffs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(reference, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=STEPS, lr=3e-3, min_lr=3e-4, warmup=2,
                       precision=precision)
    state = ParallelState.single()
    model = build_model(CFG, state, dtype=dtype)
    model.init_weights(seed=5)
    trainer = Trainer(model, CFG, state, tcfg, counting_sampler(CFG.vocab_size, tcfg.seq_len))
    losses = [log.loss for log in trainer.train()]
    assert next(model.parameters()).dtype == dtype
    assert trainer.optimizer.master.dtype == torch.float32
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 0.1  # same curve, low-precision noise
    assert losses[-1] < losses[0] - 0.3


def test_recompute_gives_identical_training(reference):
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=5, lr=3e-3, min_lr=3e-4, warmup=2,
                       recompute="full")
    model = build_model(CFG)
    model.init_weights(seed=5)
    losses = [log.loss for log in Trainer(model, CFG, ParallelState.single(), tcfg,
                                          counting_sampler(CFG.vocab_size, 16)).train()]
    ref = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=5, lr=3e-3, min_lr=3e-4, warmup=2)
    model = build_model(CFG)
    model.init_weights(seed=5)
    expected = [log.loss for log in Trainer(model, CFG, ParallelState.single(), ref,
                                            counting_sampler(CFG.vocab_size, 16)).train()]
    assert losses == expected


def test_fp16_overflow_skips_the_step_and_backs_off():
    from mzoo.train.trainer import LossScaler

    model = build_model(CFG)
    model.init_weights(seed=5)
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=2, steps=1, precision="fp16")
    trainer = Trainer(model, CFG, ParallelState.single(), tcfg, counting_sampler(CFG.vocab_size, 16))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.scaler = LossScaler(True, initial=float("inf"))  # guaranteed overflow
    log = trainer.train_step()
    assert log.skipped and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    scaler = LossScaler(True, initial=8.0, window=2)
    scaler.update(True)
    assert scaler.scale == 4.0
    scaler.update(False), scaler.update(False)
    assert scaler.scale == 8.0


# ---- pipeline parallelism --------------------------------------------------------------------------
CFG4 = CFG.replace(num_layers=4)
CFG4_TIED = CFG4.replace(tie_embeddings=True)


def _train_chunks(cfg: ModelConfig, state: ParallelState, dist_opt: bool = False) -> list[float]:
    from mzoo.models import build_chunks

    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=STEPS, lr=3e-3, min_lr=3e-4, warmup=2,
                       distributed_optimizer=dist_opt)
    model = build_chunks(cfg, state)
    model.init_weights(seed=5)
    return [log.loss for log in Trainer(model, cfg, state, tcfg, counting_sampler(cfg.vocab_size, 16)).train()]


def _pp_worker(rank, world, cfg, layout):
    torch.manual_seed(0)
    return _train_chunks(cfg, ParallelState.build(Layout(**layout)))


@pytest.mark.dist
@pytest.mark.parametrize(
    "cfg, layout, world",
    [
        (CFG4, dict(pp=2), 2),
        (CFG4, dict(pp=2, vpp=2), 2),
        (CFG4_TIED, dict(pp=2), 2),
        (CFG4, dict(tp=2, pp=2), 4),
    ],
    ids=["pp2-1f1b", "pp2-vpp2-interleaved", "pp2-tied-embeddings", "tp2xpp2"],
)
def test_pipeline_loss_curve_matches_single_process(cfg, layout, world):
    torch.set_num_threads(1)
    expected = _train_chunks(cfg, ParallelState.single())
    assert expected[-1] < expected[0] - 0.3
    for losses in D.run(_pp_worker, world, cfg, layout):
        assert max(abs(a - b) for a, b in zip(losses, expected)) <= 1e-5, (losses, expected)


# Qwen2 (q/k/v biases without an o bias, tied) and Qwen3 (per-head q/k norms, head_dim 16 != 32 / 4):
# the biases split over TP with their heads, each TP rank's q/k norm grads come from its own heads
QWEN = {"qwen2": CFG4.replace(family="qwen2", add_qkv_bias=True, tie_embeddings=True),
        "qwen3": CFG4.replace(family="qwen3", qk_layernorm=True, head_dim=16)}


def _qwen_worker(rank, world, layout):
    torch.manual_seed(0)
    return {name: _train_chunks(cfg, ParallelState.build(Layout(**layout))) for name, cfg in QWEN.items()}


@pytest.mark.dist
@pytest.mark.parametrize("layout, world", [(dict(tp=2, sequence_parallel=True), 2), (dict(tp=2, pp=2), 4)],
                         ids=["tp2-sp", "tp2xpp2"])
def test_qwen_loss_curves_match_single_process(layout, world):
    torch.set_num_threads(1)
    expected = {name: _train_chunks(cfg, ParallelState.single()) for name, cfg in QWEN.items()}
    assert all(e[-1] < e[0] - 0.3 for e in expected.values())
    for result in D.run(_qwen_worker, world, layout):
        for name, losses in result.items():
            assert max(abs(a - b) for a, b in zip(losses, expected[name])) <= 1e-5, (name, losses, expected[name])


def _measured_flops_per_token(cfg: ModelConfig, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """FLOPs torch counts in one forward and backward of the real model; attention runs in the math
    kernel, whose matmuls the counter sees (the fused CPU kernel is invisible to it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg)
    model.init_weights(seed=5)
    model.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, labels=labels).mean().backward()
    return counter.get_total_flops() / tokens.numel()


def test_flops_and_mfu_are_reported():
    from mzoo.train.trainer import model_flops_per_token as flops_per_token  # what the trainer's MFU uses

    # no padded vocabulary rows, so the model multiplies exactly the true vocabulary the count uses
    cfg = CFG.replace(make_vocab_size_divisible_by=2)
    assert cfg.padded_vocab_size() == cfg.vocab_size
    samples = [counting_sampler(cfg.vocab_size, 16)(i) for i in range(2)]
    tokens, labels = (torch.stack([x[key] for x in samples]) for key in ("tokens", "labels"))
    measured = _measured_flops_per_token(cfg, tokens, labels)
    assert flops_per_token(cfg, 16) == pytest.approx(measured)
    # a tied embedding still multiplies the hidden states by the vocabulary for the logits
    tied = cfg.replace(tie_embeddings=True)
    assert flops_per_token(tied, 16) == pytest.approx(_measured_flops_per_token(tied, tokens, labels))
    # Qwen3's head_dim (16, not 32 / 4) sizes the projections and the attention products
    qwen3 = cfg.replace(family="qwen3", qk_layernorm=True, head_dim=16)
    assert flops_per_token(qwen3, 16) == pytest.approx(_measured_flops_per_token(qwen3, tokens, labels))

    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=1, peak_tflops=2.0)
    model = build_model(cfg)
    model.init_weights(seed=5)
    log = Trainer(model, cfg, ParallelState.single(), tcfg, counting_sampler(cfg.vocab_size, 16)).train()[0]
    seconds = 8 * 16 / log.tokens_per_s
    assert log.tflops_per_device > 0
    assert log.tflops_per_device == pytest.approx(measured * 8 * 16 / seconds / 1e12)  # achieved, per device
    assert log.mfu == pytest.approx(log.tflops_per_device / 2.0)  # achieved / peak
