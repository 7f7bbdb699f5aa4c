"""Device-leak guard: every tensor a training step creates must live on the model's device.

The step runs with `torch.device("meta")` as the default device while the model and data live on
the CPU, so any tensor made without an explicit device (what would land on the CPU while the model
is on a GPU) becomes a meta tensor and the first op that mixes it with a real one raises; on top of
that, a factory call in mzoo's own code without `device=` fails at once with its file and line
(a meta tensor handed to a gloo collective can hang instead of failing). Each
family and each layout class is covered: dense TP + SP, PP (tied embeddings across stages),
interleaved PP, DP + the distributed optimizer, MoE with EP (+ the aux-free bias update), MLA,
Mamba-1, Mamba-2, the hybrid stack, packed finetuning samples through a pipeline, overlapped DP
reductions and all-gathers, context parallelism (plain and packed), LoRA adapters (bf16, TP2 + SP),
and a save's gathers. Then the model is on a fresh device type check: parameters, buffers and optimizer state all
on the CPU (nothing left on meta).
"""

from __future__ import annotations

import sys
from pathlib import Path

import dist as D
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from mzoo.layout import Layout
from mzoo.models import build_chunks
from mzoo.parallel.state import ParallelState
from mzoo.train.run import gather_canonical
from mzoo.train.trainer import TrainConfig, Trainer
from mzoo.zoo import resolve

REPO = Path(__file__).resolve().parents[2]
PRODUCT = tuple(str(REPO / room) for room in ("mzoo", "models", "converters", "cli"))


class DeviceRequired(TorchFunctionMode):
    """Fails at once, naming the line, when mzoo's own code calls a tensor factory (zeros, arange,
    tensor, ...) without `device=`: such a tensor lands on the default device, not the model's.
    Torch's internals are left to the meta default device, which makes their leaks fail too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PRODUCT):
                raise AssertionError(f"{caller.f_code.co_filename}:{caller.f_lineno} calls torch.{func.__name__} "
                                     "without device= inside a training step")
        return func(*args, **kwargs)


FAMILIES = ["llama-tiny", "gpt-tiny", "mixtral-tiny", "deepseek-tiny", "mamba1-tiny", "mamba-tiny",
            "mamba-hybrid-tiny", "qwen3-tiny", "qwen3-moe-tiny", "gpt-oss-tiny"]


def _sampler(vocab: int, seq_len: int, packed: bool = False):
    """Mock pretraining data (the real dataset class), or packed finetuning samples (the real packer):
    both made on the CPU before the guarded step, as the data pipeline makes them."""
    if not packed:
        from mzoo.data.gpt import MockGPTDataset

        return MockGPTDataset(vocab, seq_len, seed=7)
    from mzoo.data.sft import Example, pack, sampler

    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, vocab, (n,), generator=g).tolist(), [i % 2 == 0] * n)
                for i, n in enumerate([5, 9, 6, 4, 7, 8, 3, 10] * 4)]
    return sampler(pack(examples, seq_len), seed=1)


def _guarded_steps(name: str, state: ParallelState, packed: bool = False, **train) -> dict:
    name, _, layers = name.partition(":")
    cfg = resolve(name) if not layers else resolve(name).replace(num_layers=int(layers))
    lora = train.pop("lora", False)  # a LoRA finetune: the base frozen, adapters on every target
    tcfg = TrainConfig(seq_len=16, micro_batch=1, global_batch=4, steps=2, lr=1e-3, **train)
    model = build_chunks(cfg, state)
    model.init_weights(seed=3)
    if lora:
        from mzoo.models.lora import add_lora
        from mzoo.parallel.lora import LoRAConfig

        add_lora(model, cfg, LoRAConfig(4, dropout=0.1), seed=1, b_std=0.02)
    trainer = Trainer(model, cfg, state, tcfg, _sampler(cfg.vocab_size, tcfg.seq_len, packed))
    with torch.device("meta"), DeviceRequired():
        logs = [trainer.train_step() for _ in range(2)]
        tensors = gather_canonical(model, state)
        states = trainer.optimizer.param_states(("exp_avg",))
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    devices |= {t.device.type for g, _ in trainer.optimizer.groups for t in g.shards().values()}
    return {"losses": [log.loss for log in logs], "devices": devices,
            "saved": {t.device.type for t in tensors.values()} | {t.device.type for t in states["exp_avg"]}}


def _check(result: dict) -> None:
    assert all(torch.isfinite(torch.tensor(result["losses"]))), result["losses"]
    assert result["devices"] == {"cpu"}
    assert result["saved"] == {"cpu"}


@pytest.mark.parametrize("name", FAMILIES)
def test_one_process_step_creates_nothing_off_device(name):
    _check(_guarded_steps(name, ParallelState.single()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_creates_nothing_off_device(precision):
    _check(_guarded_steps("llama-tiny", ParallelState.single(), precision=precision))


def test_lora_step_creates_nothing_off_device_and_adapters_build_on_the_device():
    from mzoo.models.lora import add_lora
    from mzoo.parallel.lora import LoRAConfig

    _check(_guarded_steps("llama-tiny", ParallelState.single(), lora=True, precision="bf16"))
    cfg = resolve("llama-tiny")
    model = build_chunks(cfg, ParallelState.single(), device="meta")
    add_lora(model, cfg, LoRAConfig(4))
    assert {p.device.type for p in model.parameters()} == {"meta"}


# (preset, layout, training options, packed data) on 2 ranks; all in one spawn (starting ranks costs seconds)
LAYOUTS = [
    ("llama-tiny", dict(tp=2, sequence_parallel=True), {}, False),
    ("gpt-tiny", dict(pp=2), {}, False),  # tied embeddings: the embedding group's gradient sum
    ("llama-tiny:4", dict(pp=2, vpp=2), {}, False),  # 4 layers: 2 chunks per stage
    ("llama-tiny", dict(pp=2), {}, True),  # packed samples: positions and segments on every stage
    ("llama-tiny", dict(dp=2), dict(distributed_optimizer=True), False),
    ("mixtral-tiny", dict(dp=2, ep=2), dict(distributed_optimizer=True), False),
    ("deepseek-tiny", dict(dp=2, ep=2), {}, False),
    ("mixtral-tiny", dict(tp=2, sequence_parallel=True), {}, False),
    ("mamba-tiny", dict(tp=2), {}, False),
    ("mamba-hybrid-tiny", dict(pp=2), {}, False),
    ("llama-tiny", dict(dp=2), dict(distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
                                    bucket_elements=20_000), False),  # overlapped buckets and all-gathers
    ("llama-tiny", dict(cp=2), {}, False),  # context parallelism: chunks, gathered K/V, tiled attention
    ("llama-tiny", dict(cp=2), {}, True),  # ... with packed segments
    ("llama-tiny", dict(tp=2, sequence_parallel=True), dict(lora=True, precision="bf16"), False),  # LoRA adapters
]


def _worker(rank, world):
    out = []
    for name, layout, train, packed in LAYOUTS:
        state = ParallelState.build(Layout(**layout))
        out.append(_guarded_steps(name, state, packed, **train))
    return out


@pytest.mark.dist
def test_parallel_steps_create_nothing_off_device():
    for rank_results in D.run(_worker, 2):
        for (name, layout, _, _), result in zip(LAYOUTS, rank_results):
            try:
                _check(result)
            except AssertionError as e:
                raise AssertionError(f"{name} {layout}: {e}") from None


@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_and_buffer_is_built_on_the_requested_device(name):
    """A GPU rank's model is built on its GPU: with 'meta' standing in for it, no parameter or buffer
    (rotary frequencies, router counts) may stay behind on the CPU."""
    model = build_chunks(resolve(name), ParallelState.single(), device="meta")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not left, left
