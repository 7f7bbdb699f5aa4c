"""`mzoo plan`: rank the parallel layouts that fit a model on N GPUs by estimated step time (or
evaluate one, `--check`), for mzoo's engine or Megatron-Core + TE with the other beside it; and the
`mzoo train --dry-run` report (one rank's parameters and memory, nothing allocated or launched)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from mzoo.capacity import require_memory
from mzoo.ckpt.legacy import split_layer_name
from mzoo.config import ModelConfig
from mzoo.errors import UserError
from mzoo.layout import Layout
from mzoo.models import build_chunks
from mzoo.models.canonical import kind_tensors
from mzoo.parallel.lora import parse_targets
from mzoo.parallel.state import ParallelState
from mzoo.plan.constants import GIB
from mzoo.plan.costs import Stage, stages
from mzoo.plan.explain import explain, seconds
from mzoo.plan.hardware import GPU, gpu as gpu_named
from mzoo.plan.memory import Memory, stage_memory
from mzoo.plan.profile import Profile, engine_profile, megatron_profile
from mzoo.plan.search import Plan, evaluate, plan as ranked_layouts
from mzoo.plan.settings import Settings, default_global_batch, default_seq_len
from mzoo.train.fit import settings_of
from mzoo.train.trainer import TrainConfig
from mzoo.zoo import resolve

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class PlanRequest:
    model: str  # zoo preset or model YAML
    gpus: int
    gpu: tuple[str, ...] = ("h100-80gb",)  # GPU types to compare
    gpus_per_node: int = 8
    seq_len: Optional[int] = None  # default: min(4096, the model's context)
    global_batch: Optional[int] = None  # default: about 4M tokens
    micro_batch: int = 1
    recompute: str = "none"
    distributed_optimizer: bool = True
    fp8: bool = False
    grad_reduce_in_fp32: bool = True
    engine: str = "mzoo"  # whose memory and speed to rank by: mzoo or megatron
    headroom: float = 0.05
    top: int = 10
    check: Optional[Layout] = None  # evaluate this one layout instead of searching
    lora_rank: int = 0  # a LoRA finetune: the base frozen, adapters of this rank train (memory; step time is full's)
    lora_targets: str = "qkv,proj,fc1,fc2"


@dataclass
class PlanResult:
    cfg: ModelConfig
    gpus: int
    settings: Settings
    plans: list[Plan]  # best first per GPU type (the top K of each), or the checked layout per GPU type
    other: list[Plan]  # the other engine's plan of each layout, for the comparison column
    why: dict[str, str]  # per GPU type: the explanation, or the checked layout's verdict
    checked: bool = False

    @property
    def feasible(self) -> bool:
        return all(p.feasible for p in self.plans)


def settings_from(req: PlanRequest, cfg: ModelConfig) -> Settings:
    """Settings from the request, every impossible value one sentence."""
    if req.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {req.gpus}.")
    if req.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be at least 1, got {req.gpus_per_node}.")
    if req.recompute not in RECOMPUTE:
        raise UserError(f"unknown --recompute '{req.recompute}'; use none, selective or full.")
    if req.micro_batch < 1 or req.top < 1:
        raise UserError("--micro-batch and --top must be at least 1.")
    seq = req.seq_len if req.seq_len is not None else default_seq_len(cfg)
    if seq < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq}.")
    if cfg.position_embedding == "learned" and seq > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {seq} exceeds the model's {cfg.max_position_embeddings} learned positions.")
    batch = req.global_batch if req.global_batch is not None else default_global_batch(seq)
    if batch < req.micro_batch:
        raise UserError(f"--global-batch {batch} is smaller than --micro-batch {req.micro_batch}.")
    lora = frozenset(parse_targets(req.lora_targets)) if req.lora_rank else frozenset()
    if req.lora_rank < 0:
        raise UserError(f"--lora-rank {req.lora_rank} must be at least 1 (or 0: no LoRA).")
    return Settings(seq, batch, req.micro_batch, req.recompute, req.distributed_optimizer, req.fp8,
                    req.grad_reduce_in_fp32, req.gpus_per_node, req.headroom, lora_rank=req.lora_rank, lora_parts=lora)


def profile_of(settings: Settings, engine: str) -> Profile:
    """The profile ranked by: mzoo's engine in bf16 on GPUs, or Megatron-Core + TE."""
    if engine == "megatron":
        return megatron_profile(settings.grad_fp32, settings.fp8)
    return engine_profile("bf16", sequence_parallel=True, device="cuda", overlap=True)  # as train --gpus runs


def _other(cfg: ModelConfig, gpus: int, settings: Settings, plans: list[Plan], engine: str) -> list[Plan]:
    """The other engine's plan for each shown layout (the labelled comparison)."""
    other = profile_of(settings, "mzoo" if engine == "megatron" else "megatron")
    return [evaluate(cfg, p.layout, settings, p.gpu, gpus, other) for p in plans]


def _versus(cfg: ModelConfig, gpus: int, settings: Settings, g: GPU, ranked: list[Plan], engine: str) -> str:
    """A sentence on the other engine's fastest layout, when mzoo's engine is the one ranked."""
    if engine != "mzoo":
        return ""
    best = ranked_layouts(cfg, gpus, settings, g, profile_of(settings, "megatron"))[0]
    if not best.feasible:
        return " Megatron-Core + TE has no layout that fits either."
    ours = ranked[0] if ranked and ranked[0].feasible else None
    gap = f", {best.time.mfu / ours.time.mfu:.2f}x mzoo's MFU" if ours else ""
    runs = "" if best.layout.mzoo_engine else " (a layout mzoo's engine cannot run yet)"
    return (f" For comparison, Megatron-Core + TE's fastest is {best.layout.label()}{runs}: "
            f"{best.memory.total / GIB:.1f} GiB, {seconds(best.time.step)} per step, MFU {best.time.mfu:.1%}{gap}.")


def plan(req: PlanRequest) -> PlanResult:
    """Every check first (model, GPU names, engine, headroom, settings, FP8 support), then the plans."""
    cfg = resolve(req.model)
    gpu_types = [gpu_named(name) for name in req.gpu]  # unknown names: one sentence, before any work
    if req.engine not in ("mzoo", "megatron"):
        raise UserError(f"unknown --engine '{req.engine}'; use mzoo or megatron.")
    if not 0 <= req.headroom < 1:
        raise UserError(f"--headroom {req.headroom} must be a share of memory from 0 up to (not including) 1, "
                        "e.g. 0.05.")
    settings = settings_from(req, cfg)
    primary = profile_of(settings, req.engine)
    for g in gpu_types:
        if req.fp8 and g.fp8_tflops is None:
            raise UserError(f"the {g.name} has no FP8 tensor cores; drop --fp8 or pick another --gpu.")
    if req.check is not None:
        plans = [evaluate(cfg, req.check, settings, g, req.gpus, primary) for g in gpu_types]
        return PlanResult(cfg, req.gpus, settings, plans, _other(cfg, req.gpus, settings, plans, req.engine),
                          {g.name: p.verdict() for g, p in zip(gpu_types, plans)}, checked=True)
    shown, why = [], {}
    for g in gpu_types:
        ranked = ranked_layouts(cfg, req.gpus, settings, g, primary)
        shown += ranked[:req.top]
        why[g.name] = explain(ranked) + _versus(cfg, req.gpus, settings, g, ranked, req.engine)
    return PlanResult(cfg, req.gpus, settings, shown, _other(cfg, req.gpus, settings, shown, req.engine), why)


# ---- mzoo train --dry-run --------------------------------------------------------------------------------
@dataclass
class DryRun:
    """One rank of a layout, built on the meta device, and the planner's memory estimate for it."""

    cfg: ModelConfig
    layout: Layout
    rank: int
    coordinates: dict[str, int]
    stage: Stage
    parameters: list[dict[str, Any]]
    memory: Memory
    profile: Profile
    device: str
    count: int = field(init=False)
    trainable: int = field(init=False)  # elements that train (a LoRA finetune: the adapters)

    def __post_init__(self) -> None:
        self.count = sum(p["numel"] for p in self.parameters)
        self.trainable = sum(p["numel"] for p in self.parameters if p["trainable"])

    def as_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {"dry_run": True, "model": self.cfg.name, "rank": self.rank, "world_size": lay.world_size,
                "coordinates": self.coordinates,
                "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp, "ep": lay.ep, "cp": lay.cp,
                           "sequence_parallel": lay.sequence_parallel, "first_stage_layers": lay.first_stage_layers,
                           "last_stage_layers": lay.last_stage_layers},
                "layers": list(self.stage.layers), "parameters": self.parameters, "count": self.count,
                "trainable": self.trainable,
                "memory": {"profile": self.profile.name, "device": self.device, **self.memory.as_dict()}}


# host bytes of one parameter on the meta device with its module and its report entry: 2.3-4.8 KiB
# measured on llama-, mixtral- and deepseek-tiny at 1000 layers (no tensor memory, Python objects only)
META_TENSOR_BYTES = 4 << 10


def check_listing(cfg: ModelConfig, stage: Stage, rank: int) -> None:
    """The dry run builds the rank on the meta device, whose Python objects grow with its layers: a
    config claiming 10M layers is refused in one sentence instead of a MemoryError an hour later."""
    per_layer = Counter(split_layer_name(t.name)[0] for t in kind_tensors(cfg))
    tensors = stage.num_layers * max((n for layer, n in per_layer.items() if layer is not None), default=0) + \
        per_layer[None]
    require_memory(tensors * META_TENSOR_BYTES, "cpu", f"listing rank {rank}'s {tensors:,} parameter tensors "
                   f"({stage.num_layers:,} layers) on the meta device", "check num_layers in the config; "
                   "`mzoo plan MODEL --gpus N` estimates memory without a meta model")


def dry_run(cfg: ModelConfig, layout: Layout, tcfg: TrainConfig, rank: int, device: str = "cpu",
            lora=None) -> DryRun:
    """Build rank `rank` of the layout on the meta device (no weights, no process group) with the
    planner's memory estimate for mzoo's engine on `device` ('cuda' or 'cpu'); `lora`: with the adapters
    a LoRA finetune adds (the base frozen)."""
    world = layout.world_size
    if not 0 <= rank < world:
        raise UserError(f"--dry-run-rank {rank} is outside the {world} ranks of this layout; use 0 to {world - 1}.")
    state = ParallelState.for_rank(layout, rank)
    stage = stages(cfg, layout)[state.pp_rank]
    check_listing(cfg, stage, rank)
    chunks = build_chunks(cfg, state, device="meta")
    if lora is not None:
        from mzoo.models.lora import add_lora

        add_lora(chunks, cfg, lora)
    params = [{"name": n, "shape": list(p.shape), "numel": p.numel(), "trainable": p.requires_grad}
              for n, p in chunks.canonical_parameters()]
    profile = engine_profile(tcfg.precision, layout.sequence_parallel, device)
    mem = stage_memory(cfg, layout, settings_of(tcfg, lora), profile, stage)
    coords = {"tp_rank": state.tp_rank, "cp_rank": state.cp_rank, "dp_rank": state.dp_rank, "pp_rank": state.pp_rank,
              "ep_rank": state.ep_rank, "edp_rank": state.edp_rank}
    return DryRun(cfg, layout, rank, coords, stage, params, mem, profile, device)
