"""One training run inside a (possibly torchrun-launched) process: process group, layout, model,
weights, data, loop, logs, checkpoint.

The core cannot import models or converters (they sit above it), so the caller injects them
through `Hooks`; `mzoo train` passes the real ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from mzoo.config import ConfigError, ModelConfig, ParallelConfig
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import Sampler, StepLog, TrainConfig, Trainer


@dataclass
class Hooks:
    build_model: Callable[[ModelConfig, ParallelState], torch.nn.Module]
    load_weights: Callable[[torch.nn.Module, str], None]  # any checkpoint, any layout
    save_checkpoint: Callable[[ModelConfig, dict[str, torch.Tensor], Path, int], None]  # rank 0, canonical tensors
    make_sampler: Callable[[ModelConfig, TrainConfig], Sampler]


@dataclass
class RunConfig:
    model: ModelConfig
    layout: ParallelConfig
    train: TrainConfig
    load: Optional[str] = None
    save: Optional[str] = None
    log_json: Optional[str] = None


def in_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group() -> None:
    if dist.is_initialized() or not in_launcher():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)


def build_state(layout: ParallelConfig) -> ParallelState:
    if not dist.is_initialized():
        if layout.world_size != 1:
            raise ConfigError(f"the layout needs {layout.world_size} processes but this is a single process.")
        return ParallelState.single(layout)
    return ParallelState.build(layout)


@torch.no_grad()
def gather_canonical(model: torch.nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """Full canonical tensors (TP shards merged, vocab padding trimmed) on every TP rank.
    Holds the whole model: fine for the sizes `mzoo train` saves today (see issue notes)."""
    from mzoo.parallel.sharding import get_spec

    out = {}
    for name, p in model.named_parameters():
        spec = get_spec(p)
        value = p.detach()
        if spec.axis == "tp" and state.tp_group is not None:
            parts = [torch.empty_like(value) for _ in range(state.tp)]
            dist.all_gather(parts, value.contiguous(), group=state.tp_group)
            value = spec.merge(parts)
        if spec.vocab:
            value = value[: model.cfg.vocab_size]
        out[model.canonical_name(name)] = value.clone()
    return out


def run(rc: RunConfig, hooks: Hooks, on_step: Callable[[StepLog], None] = lambda s: None) -> list[StepLog]:
    init_process_group()
    state = build_state(rc.layout)
    torch.manual_seed(rc.train.seed)
    model = hooks.build_model(rc.model, state)
    if rc.load:
        hooks.load_weights(model, rc.load)
    else:
        model.init_weights(seed=rc.train.seed)
    trainer = Trainer(model, rc.model, state, rc.train, hooks.make_sampler(rc.model, rc.train))
    log_file = open(rc.log_json, "w") if rc.log_json and state.rank == 0 else None

    def step(log: StepLog) -> None:
        if log_file:
            log_file.write(json.dumps(asdict(log)) + "\n")
            log_file.flush()
        on_step(log)

    try:
        logs = trainer.train(on_step=step)
    finally:
        if log_file:
            log_file.close()
    if rc.save:
        tensors = gather_canonical(model, state)
        if state.rank == 0:
            hooks.save_checkpoint(rc.model, tensors, Path(rc.save), trainer.step)
        if dist.is_initialized():
            dist.barrier()
    return logs


def summary(rc: RunConfig) -> dict[str, Any]:
    lay = rc.layout
    return {"model": rc.model.name or rc.model.family, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
            "sequence_parallel": lay.sequence_parallel, "world_size": lay.world_size,
            "global_batch": rc.train.global_batch, "micro_batch": rc.train.micro_batch,
            "microbatches_per_rank": rc.train.global_batch // (rc.train.micro_batch * lay.dp),
            "seq_len": rc.train.seq_len, "steps": rc.train.steps}
