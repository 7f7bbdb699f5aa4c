"""Before a run allocates anything: does one rank's estimated peak fit the memory of its device?

The estimate is the planner's model of mzoo's own engine (mzoo/plan/, `engine_profile`), which the
measured checks hold within 3% of the real peak on CPUs. The capacity is mzoo.capacity's: on a GPU
what the driver reports free on this rank's device, less a headroom for the allocator's fragmentation;
on a CPU the host's available memory, shared by the processes this node starts. When the run does not fit,
the one sentence names both numbers and the first change of settings that would fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from mzoo.capacity import capacity
from mzoo.config import ModelConfig
from mzoo.layout import Layout
from mzoo.plan.constants import GIB
from mzoo.plan.hardware import detect, gpu as named_gpu
from mzoo.plan.memory import memory
from mzoo.plan.profile import engine_profile
from mzoo.plan.search import plan
from mzoo.plan.settings import Settings


@dataclass(frozen=True)
class Fit:
    need: float  # bytes per process (the busiest pipeline stage)
    available: float  # bytes per process
    where: str  # "GPU cuda:0 (79.1 GiB free)" or "this machine (21.3 GiB available for 2 processes)"

    @property
    def fits(self) -> bool:
        return self.need <= self.available


def settings_of(tcfg, lora=None):
    """The planner's Settings for a run's TrainConfig (the dry run and the fit check share it); `lora`
    (mzoo.parallel.lora.LoRAConfig): only its adapters train."""
    return Settings(tcfg.seq_len, tcfg.global_batch, tcfg.micro_batch, tcfg.recompute, tcfg.distributed_optimizer,
                      recompute_modules=frozenset(tcfg.recompute_modules) if tcfg.recompute_modules else None,
                      recompute_layers=tcfg.recompute_num_layers, lora_rank=lora.rank if lora else 0,
                      lora_parts=frozenset(lora.parts) if lora else frozenset())


def estimate(cfg: ModelConfig, layout: Layout, tcfg, device_type: str, lora=None) -> float:
    """Peak bytes of the busiest rank of `layout` training with `tcfg` on mzoo's engine."""
    profile = engine_profile(tcfg.precision, layout.sequence_parallel, device_type)
    return memory(cfg, layout, settings_of(tcfg, lora), profile).total


def check(cfg: ModelConfig, layout: Layout, tcfg, device: torch.device, local_processes: int, lora=None) -> Fit:
    available, where = capacity(device, local_processes)
    return Fit(estimate(cfg, layout, tcfg, device.type, lora), available, where)


def suggestion(cfg: ModelConfig, layout: Layout, tcfg, device: torch.device, available: float) -> str:
    """The first change of flags, cumulatively, that fits: recomputation, the distributed optimizer,
    micro-batch 1, shorter sequences; or why nothing on this many processes can."""
    steps: list[tuple[str, dict]] = []
    if tcfg.recompute != "full":
        steps.append(("--recompute full", {"recompute": "full"}))
    if layout.dp * layout.cp > 1 and not tcfg.distributed_optimizer:
        steps.append(("--distributed-optimizer", {"distributed_optimizer": True}))
    if tcfg.micro_batch > 1:
        steps.append(("--micro-batch 1", {"micro_batch": 1}))
    flags, trial = [], tcfg
    for flag, change in steps:
        trial = replace(trial, **change)
        flags.append(flag)
        if estimate(cfg, layout, trial, device.type) <= available:
            return f"{' '.join(flags)} would fit"
    seq = trial.seq_len
    while seq > 256:
        seq //= 2
        if estimate(cfg, layout, replace(trial, seq_len=seq), device.type) <= available:
            return f"{' '.join(flags + [f'--seq-len {seq}'])} would fit"
    floor = estimate(cfg, layout, replace(trial, seq_len=1, micro_batch=1), device.type)
    return (f"even its weights, gradients and optimizer state need {floor / GIB:.1f} GiB per process at "
            f"tp={layout.tp} pp={layout.pp}, so split it over more devices (see `mzoo plan {cfg.name or 'MODEL'} "
            "--gpus N`) or train a smaller preset")


def refusal(cfg: ModelConfig, layout: Layout, tcfg, device: torch.device, fit: Fit) -> str:
    """Both numbers and what would fit (the caller ends the sentence)."""
    cp = f" cp={layout.cp}" if layout.cp > 1 else ""
    what = (f"{cfg.name or 'this model'} at tp={layout.tp} pp={layout.pp}{cp} dp={layout.dp} ep={layout.ep} "
            f"({tcfg.precision}, seq {tcfg.seq_len}, micro batch {tcfg.micro_batch}, recompute {tcfg.recompute})")
    return (f"{what} needs about {fit.need / GIB:.1f} GiB per process but {fit.where} offers "
            f"{fit.available / GIB:.1f} GiB; {suggestion(cfg, layout, tcfg, device, fit.available)}")


def gpu_type(requested: Optional[str] = None) -> str:
    """The planner's GPU model: the one asked for, else this machine's (the planner's GPU table), else an H100."""
    if requested:
        return requested
    found = detect()
    return found.name if found else "h100-80gb"


@dataclass(frozen=True)
class AutoLayout:
    layout: Layout  # with sequence parallelism wherever TP > 1
    why: str


def auto_layout(cfg: ModelConfig, tcfg, gpus: int, gpu: str) -> AutoLayout:
    """The fastest layout of `gpus` GPUs that mzoo's engine runs and that fits, by the planner (mzoo's
    engine profile, bf16 unless the run says otherwise), with one sentence saying why."""
    from mzoo.errors import UserError

    settings = replace(settings_of(tcfg), distributed_optimizer=True)
    profile = engine_profile(tcfg.precision, sequence_parallel=True, device="cuda", overlap=True)
    ranked = plan(cfg, gpus, settings, named_gpu(gpu), profile)
    best = ranked[0]
    if not best.feasible:
        raise UserError(f"no layout of {gpus} {gpu} GPUs fits {cfg.name or 'this model'} on mzoo's engine: "
                        f"{best.verdict()} Add GPUs, --recompute full or a shorter --seq-len.")
    lay = best.layout
    sp = " with sequence parallelism" if lay.tp > 1 else ""
    why = (f"layout from the planner: {lay.label()}{sp} and the distributed optimizer, the fastest of "
           f"{sum(p.feasible for p in ranked)} layouts that fit {gpus} x {gpu} "
           f"({best.memory.total / GIB:.1f} of {best.usable_gib:.1f} GiB per GPU, estimated MFU {best.time.mfu:.0%}; "
           f"`mzoo plan {cfg.name or 'MODEL'} --gpus {gpus}` shows the others)")
    return AutoLayout(replace(lay, sequence_parallel=lay.tp > 1), why)
