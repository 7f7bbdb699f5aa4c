"""Which layouts can run a model (`problems`), what one costs (`evaluate`), and every candidate ranked
(`plan`): feasible layouts by step time, then the rest by memory."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional

from mzoo.config import ConfigError, ModelConfig
from mzoo.errors import UserError
from mzoo.layout import Layout
from mzoo.parallel.pipeline import stage_layers
from mzoo.plan.constants import GIB, HEADROOM, MAX_VPP, MIN_CP_TOKENS
from mzoo.plan.costs import Model, as_model
from mzoo.plan.hardware import GPU
from mzoo.plan.memory import Memory, memory
from mzoo.plan.profile import Profile, megatron_profile
from mzoo.plan.settings import Settings
from mzoo.plan.steptime import StepTime, step_time


def problems(cfg: ModelConfig, layout: Layout, settings: Settings, gpus: Optional[int] = None) -> list[str]:
    """Why this layout cannot run this model with these settings (one sentence each); [] if it can."""
    out: list[str] = []
    if gpus is not None and layout.world_size != gpus:
        out.append(f"tp x pp x cp x dp = {layout.world_size}, not the {gpus} GPUs asked for.")
    for name in ("tp", "pp", "dp", "vpp", "ep", "cp"):
        if getattr(layout, name) < 1:
            return out + [f"{name} must be at least 1."]
    try:
        layout.validate_for(cfg)
    except ConfigError as e:
        out.append(str(e))
    if cfg.ssm is not None and cfg.ssm.version == 1 and cfg.mamba_dims()["d_inner"] % layout.tp:
        out.append(f"tp={layout.tp} does not divide the Mamba inner size {cfg.mamba_dims()['d_inner']}.")
    gpn = settings.gpus_per_node
    if layout.tp > gpn or (layout.world_size >= gpn and gpn % layout.tp):
        out.append(f"tp={layout.tp} must divide the {gpn} GPUs of a node: TP's per-layer collectives need NVLink.")
    if cfg.moe is not None and layout.ep >= 1:
        pool = layout.dp * layout.cp * (layout.tp // layout.expert_tp)
        if pool % layout.ep:
            what = "dp x cp" if layout.expert_tp == layout.tp else "tp x dp x cp"
            out.append(f"ep={layout.ep} must divide {what} = {pool}: expert-parallel groups are carved out of "
                       "those ranks.")
        if layout.expert_tp not in (1, layout.tp):
            out.append(f"expert tp must be 1 or tp, not {layout.expert_tp}.")
    try:
        stage_layers(cfg.num_layers, layout.pp, layout.vpp, layout.first_stage_layers, layout.last_stage_layers)
    except ConfigError as e:
        out.append(str(e))
    split = replace(layout, sequence_parallel=layout.tp > 1).sequence_problem(settings.seq_len)  # the engine's rule
    if split is not None:
        out.append(split)
    elif layout.cp > 1 and settings.seq_len // layout.cp < MIN_CP_TOKENS:
        out.append(f"cp={layout.cp} leaves {settings.seq_len // layout.cp} tokens per rank, fewer than "
                   f"{MIN_CP_TOKENS}: too little work per GPU for the attention and GEMM kernels.")
    if settings.global_batch % (settings.micro_batch * layout.dp):
        out.append(f"global batch {settings.global_batch} is not a multiple of micro batch {settings.micro_batch} "
                   f"x dp {layout.dp}.")
    elif layout.vpp > 1 and settings.microbatches(layout) % layout.pp:
        out.append(f"interleaved pipelining needs the {settings.microbatches(layout)} micro-batches to be a "
                   f"multiple of pp={layout.pp}.")
    return out


# ---- plans ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One layout on one GPU type: why it cannot run, or its memory and step time."""

    layout: Layout
    gpu: GPU
    problems: list[str]
    memory: Optional[Memory] = None
    time: Optional[StepTime] = None
    headroom: float = HEADROOM
    engine: str = "megatron"  # the profile's name: megatron, or mzoo-bf16 / mzoo-fp32 ...

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def usable_gib(self) -> float:
        return self.gpu.memory_gib * (1 - self.headroom)

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.usable_gib * GIB

    @property
    def feasible(self) -> bool:
        return self.valid and self.fits

    def verdict(self) -> str:
        """One sentence: fits, or the first reason it cannot run, or which component overflows."""
        if not self.valid:
            return "not valid: " + self.problems[0]
        mem, cap = self.memory, self.usable_gib
        room = f" ({self.headroom:.0%} of {self.gpu.memory_gib:.1f} kept free)" if self.headroom else ""
        if self.fits:
            return f"fits: {mem.total / GIB:.1f} of {cap:.1f} GiB{room} on pipeline stage {mem.stage}."
        part = mem.largest()
        return (f"does not fit: pipeline stage {mem.stage} needs {mem.total / GIB:.1f} GiB but the {self.gpu.name} "
                f"offers {cap:.1f}{room}; the largest part is {part.replace('_', ' ')} "
                f"({getattr(mem, part) / GIB:.1f} GiB).")

    def as_dict(self) -> dict:
        lay = self.layout
        out = {"engine": self.engine, "gpu": self.gpu.name, "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "ep": lay.ep, "etp": lay.expert_tp,
               "cp": lay.cp, "dp": lay.dp, "first_stage_layers": lay.first_stage_layers, "last_stage_layers": lay.last_stage_layers,
               "label": lay.label(), "valid": self.valid, "feasible": self.feasible, "mzoo_engine": lay.mzoo_engine,
               "verdict": self.verdict(), "problems": self.problems,
               "memory_gb": round(self.memory.total / GIB, 3) if self.memory else None,
               "capacity_gb": round(self.gpu.memory_gib, 3), "usable_gb": round(self.usable_gib, 3),
               "mfu": round(self.time.mfu, 4) if self.time else None,
               "step_s": round(self.time.step, 4) if self.time else None}
        out["memory"] = self.memory.as_dict() if self.memory else None
        out["time"] = self.time.as_dict() if self.time else None
        return out


def evaluate(cfg, layout: Layout, settings: Settings, g: GPU, gpus: Optional[int] = None,
             profile: Optional[Profile] = None) -> Plan:
    """Memory and time of one layout (the best uneven split when the layers do not divide pp and none
    is given)."""
    model = as_model(cfg)
    cfg = model.cfg
    profile = profile or megatron_profile(settings.grad_fp32, settings.fp8)
    if layout.pp > 1 and layout.first_stage_layers is None and layout.last_stage_layers is None and cfg.num_layers % layout.pp:
        splits = [replace(layout, first_stage_layers=a, last_stage_layers=b) for a, b in uneven_splits(cfg.num_layers, layout.pp)]
        if splits and layout.vpp == 1:
            return min((evaluate(model, s, settings, g, gpus, profile) for s in splits), key=rank_key)
    found = problems(cfg, layout, settings, gpus)
    if profile.engine:
        found += engine_problems(layout, settings)
    if found:
        return Plan(layout, g, found, headroom=settings.headroom, engine=profile.name)
    return Plan(layout, g, [], memory(model, layout, settings, profile), step_time(model, layout, settings, g, profile),
                settings.headroom, profile.name)


def engine_problems(layout: Layout, settings: Settings) -> list[str]:
    """What mzoo's engine cannot run yet (Megatron-Core can)."""
    out = []
    if layout.expert_tp != layout.tp:
        out.append(f"mzoo's engine runs experts with TP = tp, not expert TP {layout.expert_tp}; Megatron-Core runs "
                   "this layout.")
    if settings.fp8:
        out.append("mzoo's engine has no FP8 (Transformer Engine) path yet.")
    return out


def uneven_splits(layers: int, pp: int) -> list[tuple[int, int]]:
    """(first, last) stage sizes with every middle stage holding ceil(layers / pp) layers and the ends
    at most that (Megatron's --decoder-first/last-pipeline-num-layers), e.g. 61 over 16: (1..4, 4..1)."""
    if pp < 2:
        return []
    per = math.ceil(layers / pp)
    rest = layers - per * (pp - 2)
    return [(f, rest - f) for f in range(max(1, rest - per), min(per, rest - 1) + 1)]  # 1 <= f, rest - f <= per


def rank_key(p: Plan) -> tuple:
    """Feasible first, by step time; then the rest by memory."""
    if p.feasible:
        return (0, p.time.step, p.memory.total)
    if p.valid:
        return (1, p.memory.total, 0.0)
    return (2, 0.0, 0.0)


def _divisors(n: int) -> list[int]:
    """Every divisor of n, ascending, in O(sqrt n) (n may be a config's 10M layers)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def candidates(cfg: ModelConfig, gpus: int, settings: Settings) -> Iterator[Layout]:
    """Every (tp, pp, cp, dp, vpp, ep, etp) with tp * pp * cp * dp = gpus (uneven splits in evaluate)."""
    experts = cfg.moe.num_experts if cfg.moe is not None else 1
    for tp in _divisors(gpus):
        if tp > settings.gpus_per_node:
            continue
        for pp in _divisors(gpus // tp):
            if pp > cfg.num_layers:
                continue
            even = pp > 1 and cfg.num_layers % pp == 0
            vpps = [v for v in _divisors(cfg.num_layers // pp) if 1 < v <= MAX_VPP] if even else []
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                for vpp in [1] + vpps:
                    for ep in _divisors(experts):
                        for etp in ([tp, 1] if (cfg.moe is not None and tp > 1) else [tp]):
                            yield Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, ep=ep, cp=cp, etp=etp)


def plan(cfg: ModelConfig, gpus: int, settings: Settings, g: GPU, profile: Optional[Profile] = None) -> list[Plan]:
    """Every valid layout for one engine (`profile`: Megatron-Core + TE unless given), evaluated and
    ranked (feasible by step time first). One sentence and no work when no layout of `gpus` GPUs is
    valid for this model."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}.")
    if settings.fp8 and g.fp8_tflops is None:
        raise UserError(f"the {g.name} has no FP8 tensor cores; drop --fp8 or pick another --gpu.")
    profile = profile or megatron_profile(settings.grad_fp32, settings.fp8)
    model = Model(cfg)
    best: dict[tuple, Plan] = {}
    reasons: dict[str, int] = {}
    for layout in candidates(cfg, gpus, settings):
        found = problems(cfg, layout, settings, gpus) + (engine_problems(layout, settings) if profile.engine else [])
        if found and not (layout.pp > 1 and cfg.num_layers % layout.pp and _only_split(found)):
            reasons[found[0]] = reasons.get(found[0], 0) + 1
            continue
        p = evaluate(model, layout, settings, g, gpus, profile)
        if not p.valid:
            reasons[p.problems[0]] = reasons.get(p.problems[0], 0) + 1
            continue
        key = layout.key()
        if key not in best or rank_key(p) < rank_key(best[key]):
            best[key] = p
    if not best:
        common = max(reasons.items(), key=lambda kv: kv[1])[0] if reasons else "no candidate layout exists."
        raise UserError(f"no layout of {gpus} GPUs is valid for {cfg.name or 'this model'} with these settings; "
                        f"the most common reason: {common[0].lower() + common[1:]}")
    return sorted(best.values(), key=rank_key)


def _only_split(found: list[str]) -> bool:
    """The only problem is an uneven layer split, which evaluate() resolves with first/last sizes."""
    return all("do not split evenly" in f for f in found)
