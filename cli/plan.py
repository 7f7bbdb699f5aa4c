"""`mzoo plan`: which parallel layout to train a model with on N GPUs, and what it costs; and the
`mzoo train --dry-run` report (one rank's parameters and memory, nothing allocated or launched)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from mzoo.cli.common import console, print_json, user_errors
from mzoo.errors import UserError

RECOMPUTE = ("none", "selective", "full")
ENGINES = {"mzoo": "mzoo's engine", "megatron": "Megatron-Core + TE"}
COMPARED = ("engine", "valid", "feasible", "verdict", "problems", "memory_gb", "mfu", "step_s")


CHECK_KEYS = ("tp", "pp", "vpp", "ep", "etp", "cp", "dp", "first", "last")


def parse_check(text: str, gpus: int):
    """'tp=4,pp=4,ep=8' -> the planner's Layout; dp defaults to gpus / (tp * pp * cp)."""
    from mzoo.plan.layout import Layout

    values: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in CHECK_KEYS:
            raise UserError(f"--check '{text}' is malformed: '{item}' is not one of "
                            f"{', '.join(k + '=N' for k in CHECK_KEYS)}; write e.g. --check tp=4,pp=4.")
        try:
            number = int(raw)
        except ValueError:
            raise UserError(f"--check '{text}' is malformed: {key} needs a positive integer, got '{raw}'.") from None
        if number < 1:
            raise UserError(f"--check '{text}' is malformed: {key} needs a positive integer, got {number}.")
        values[key] = number
    if not values:
        raise UserError("--check is empty; write e.g. --check tp=4,pp=4.")
    base = values.get("tp", 1) * values.get("pp", 1) * values.get("cp", 1)
    if "dp" not in values:
        if gpus % base:
            raise UserError(f"--check '{text}': tp x pp x cp = {base} does not divide the {gpus} GPUs.")
        values["dp"] = gpus // base
    return Layout(tp=values.get("tp", 1), pp=values.get("pp", 1), dp=values["dp"], vpp=values.get("vpp", 1),
                  ep=values.get("ep", 1), cp=values.get("cp", 1), etp=values.get("etp"),
                  first=values.get("first"), last=values.get("last"))


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@user_errors
def plan(
    model: str = typer.Argument(..., help="Zoo preset (e.g. llama3-70b) or a model YAML file."),
    gpus: int = typer.Option(..., "--gpus", help="GPUs in total."),
    gpu: list[str] = typer.Option(["h100-80gb"], "--gpu", help="GPU type, repeat to compare: h100-80gb, "
                                  "h200, a100-80gb, b200, ... (docs/plan.md)."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node (NVLink domain)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len",
                                          help="Tokens per sample (default: min(4096, the model's context))."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch",
                                               help="Samples per step (default: about 4M tokens)."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Samples per micro-batch per data-parallel rank."),
    recompute: str = typer.Option("none", "--recompute", help="Activation recomputation: none, selective or full."),
    distributed_optimizer: bool = typer.Option(True, "--distributed-optimizer/--no-distributed-optimizer",
                                               help="Shard fp32 master weights and Adam states over DP x CP."),
    fp8: bool = typer.Option(False, "--fp8", help="FP8 linear layers (Transformer Engine): faster GEMMs, "
                             "fp8 weight copies."),
    grad_reduce_in_fp32: bool = typer.Option(True, "--grad-reduce-in-fp32/--grad-reduce-in-bf16",
                                             help="Megatron's main-grad buffer in fp32 (what Megatron-LM uses for bf16 "
                                             "runs) or bf16 (megatron-core's library default)."),
    engine: str = typer.Option("mzoo", "--engine", help="Whose memory and speed to rank by: mzoo (its own engine, "
                               "bf16; Megatron-Core + TE shown beside) or megatron."),
    headroom: float = typer.Option(0.05, "--headroom", help="Share of each GPU's memory kept free for the allocator's "
                                   "fragmentation and caches (the runtime's fixed memory is counted apart)."),
    top: int = typer.Option(10, "--top", help="Show the best K layouts per GPU type."),
    check: Optional[str] = typer.Option(None, "--check", help="Evaluate one layout, e.g. tp=4,pp=4,ep=8 "
                                        "(keys: tp pp vpp ep etp cp dp first last)."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print JSON: settings, layouts (memory, MFU, breakdowns), explanation."),
) -> None:
    """Rank the parallel layouts (tp, pp, vpp, ep, cp, dp) that fit a model on N GPUs by estimated step
    time, with a per-GPU memory breakdown and MFU, and say why the best one wins (docs/plan.md).

    By default the layouts are ranked for mzoo's own engine (what `mzoo train` would use and need),
    with Megatron-Core + Transformer Engine's estimate beside each; --engine megatron ranks by that.

    Example: mzoo plan llama3-70b --gpus 64 --seq-len 8192 --global-batch 512
             mzoo plan deepseek-v3 --gpus 1024 --engine megatron --recompute selective --check tp=2,pp=16,ep=64,etp=1,first=4,last=1
    Exit status: 0, or 1 when --check's layout does not fit or is not valid.
    """
    from mzoo.plan.explain import explain
    from mzoo.plan.hardware import gpu as gpu_named
    from mzoo.plan.search import evaluate, plan as ranked_layouts
    from mzoo.zoo import resolve

    cfg = resolve(model)
    gpu_types = [gpu_named(name) for name in gpu]  # unknown names: one sentence, before any work
    if engine not in ("mzoo", "megatron"):
        raise UserError(f"unknown --engine '{engine}'; use mzoo or megatron.")
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom {headroom} must be a share of memory from 0 up to (not including) 1, e.g. 0.05.")
    settings = _settings(cfg, gpus, gpus_per_node, seq_len, global_batch, micro_batch, recompute,
                         distributed_optimizer, fp8, grad_reduce_in_fp32, top, headroom)
    primary = _profiles(settings, engine)
    for g in gpu_types:
        if fp8 and g.fp8_tflops is None:
            raise UserError(f"the {g.name} has no FP8 tensor cores; drop --fp8 or pick another --gpu.")
    layout = parse_check(check, gpus) if check is not None else None
    if layout is not None:
        plans = [evaluate(cfg, layout, settings, g, gpus, primary) for g in gpu_types]
        _show(cfg, gpus, settings, plans, {g.name: p.verdict() for g, p in zip(gpu_types, plans)}, as_json, check=True,
              other=_other(cfg, gpus, settings, plans, engine))
        if not all(p.feasible for p in plans):
            raise typer.Exit(1)
        return
    shown, why = [], {}
    for g in gpu_types:
        ranked = ranked_layouts(cfg, gpus, settings, g, primary)
        shown += ranked[:top]
        why[g.name] = explain(ranked) + _versus(cfg, gpus, settings, g, ranked, engine)
    _show(cfg, gpus, settings, shown, why, as_json, check=False, other=_other(cfg, gpus, settings, shown, engine))


def _profiles(settings, engine: str):
    """The profile ranked by: mzoo's engine in bf16 on GPUs, or Megatron-Core + TE."""
    from mzoo.plan.profile import engine_profile, megatron_profile

    if engine == "megatron":
        return megatron_profile(settings.grad_fp32, settings.fp8)
    return engine_profile("bf16", sequence_parallel=True, device="cuda")


def _other(cfg, gpus: int, settings, plans: list, engine: str) -> list:
    """The other engine's plan for each shown layout (the labelled comparison)."""
    from mzoo.plan.search import evaluate

    other = _profiles(settings, "mzoo" if engine == "megatron" else "megatron")
    return [evaluate(cfg, p.layout, settings, p.gpu, gpus, other) for p in plans]


def _versus(cfg, gpus: int, settings, g, ranked: list, engine: str) -> str:
    """A sentence on the other engine's fastest layout, when mzoo's engine is the one ranked."""
    from mzoo.plan.constants import GIB
    from mzoo.plan.explain import seconds
    from mzoo.plan.search import plan as ranked_layouts

    if engine != "mzoo":
        return ""
    theirs = ranked_layouts(cfg, gpus, settings, g, _profiles(settings, "megatron"))
    best = theirs[0]
    if not best.feasible:
        return " Megatron-Core + TE has no layout that fits either."
    ours = ranked[0] if ranked and ranked[0].feasible else None
    gap = f", {best.time.mfu / ours.time.mfu:.2f}x mzoo's MFU" if ours else ""
    runs = "" if best.layout.mzoo_engine else " (a layout mzoo's engine cannot run yet)"
    return (f" For comparison, Megatron-Core + TE's fastest is {best.layout.label()}{runs}: "
            f"{best.memory.total / GIB:.1f} GiB, {seconds(best.time.step)} per step, MFU {best.time.mfu:.1%}{gap}.")


def _settings(cfg, gpus: int, gpus_per_node: int, seq_len: Optional[int], global_batch: Optional[int],
              micro_batch: int, recompute: str, distributed_optimizer: bool, fp8: bool, grad_fp32: bool, top: int,
              headroom: float = 0.05):
    """Settings from the flags, every impossible value one sentence."""
    from mzoo.plan.settings import Settings, default_global_batch, default_seq_len

    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}.")
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be at least 1, got {gpus_per_node}.")
    if recompute not in RECOMPUTE:
        raise UserError(f"unknown --recompute '{recompute}'; use none, selective or full.")
    if micro_batch < 1 or top < 1:
        raise UserError("--micro-batch and --top must be at least 1.")
    seq = seq_len if seq_len is not None else default_seq_len(cfg)
    if seq < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq}.")
    if cfg.position_embedding == "learned" and seq > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {seq} exceeds the model's {cfg.max_position_embeddings} learned positions.")
    batch = global_batch if global_batch is not None else default_global_batch(seq)
    if batch < micro_batch:
        raise UserError(f"--global-batch {batch} is smaller than --micro-batch {micro_batch}.")
    return Settings(seq, batch, micro_batch, recompute, distributed_optimizer, fp8, grad_fp32, gpus_per_node,
                      headroom)


def _settings_dict(settings) -> dict:
    return {"seq_len": settings.seq_len, "global_batch": settings.global_batch, "micro_batch": settings.micro_batch,
            "recompute": settings.recompute, "distributed_optimizer": settings.distributed_optimizer,
            "fp8": settings.fp8, "grad_reduce_in_fp32": settings.grad_fp32, "gpus_per_node": settings.gpus_per_node,
            "headroom": settings.headroom}


def _show(cfg, gpus: int, settings, plans: list, why: dict, as_json: bool, check: bool, other: list) -> None:
    from mzoo.plan.explain import seconds

    if as_json:  # a list of layouts, best first per GPU type; each carries the run it describes
        key = "verdict" if check else "explanation"
        rows, explained = [], set()
        for p, o in zip(plans, other):
            row = {**p.as_dict(), "model": cfg.name, "gpus": gpus, "settings": _settings_dict(settings),
                   "comparison": {k: v for k, v in o.as_dict().items() if k in COMPARED}}
            if p.gpu.name not in explained:  # the top layout of each GPU type carries the paragraph
                row[key] = why[p.gpu.name]
                explained.add(p.gpu.name)
            rows.append(row)
        print_json(rows)
        return
    s = settings
    console.print(f"[bold]{cfg.name or 'model'}[/] on {gpus} GPUs ({s.gpus_per_node} per node): seq {s.seq_len}, "
                  f"global batch {s.global_batch}, micro batch {s.micro_batch}, recompute {s.recompute}, "
                  f"{'distributed' if s.distributed_optimizer else 'replicated'} optimizer, "
                  f"{'fp32' if s.grad_fp32 else 'bf16'} gradients{', fp8' if s.fp8 else ''}", highlight=False)
    if check:
        for p, o in zip(plans, other):
            _show_one(p)
            label = ENGINES[o.engine.split("-")[0]]
            console.print(f"  {label}: {o.verdict()}" + (f" MFU {o.time.mfu:.1%}." if o.time else ""), highlight=False)
        return
    first = plans[0].engine.split("-")[0] if plans else "mzoo"
    theirs = "megatron" if first == "mzoo" else "mzoo"
    for name, text in why.items():
        rows = [(p, o) for p, o in zip(plans, other) if p.gpu.name == name]
        table = Table(title=f"{name}: best {len(rows)} layouts for {ENGINES[first]}, by step time")
        for col in ("#", "layout", "memory GiB", "MFU", "step", "tok/s/GPU", "bubble", "fits",
                    f"{ENGINES[theirs]}: GiB", "MFU "):
            table.add_column(col, justify="left" if col in ("layout", "fits") else "right")
        for i, (p, o) in enumerate(rows, 1):
            mem = f"{p.memory.total / 2**30:.1f} / {p.usable_gib:.1f}"
            table.add_row(str(i), p.layout.label(), mem, f"{p.time.mfu:.1%}", seconds(p.time.step),
                          f"{p.time.tokens_per_s / p.layout.world:,.0f}", f"{p.time.bubble:.1%}",
                          "yes" if p.feasible else "[red]no[/]",
                          f"{o.memory.total / 2**30:.1f}" if o.memory else "cannot run",
                          f"{o.time.mfu:.1%}" if o.time else "-")
        console.print(table)
        console.print(text, highlight=False)


def _show_one(p) -> None:
    from mzoo.plan.explain import seconds

    color = "green" if p.feasible else "red"
    console.print(f"[bold]{p.gpu.name}[/] {p.layout.label()}: [{color}]{p.verdict()}[/]", highlight=False)
    for reason in p.problems[1:]:
        console.print(f"  also: {reason}", highlight=False)
    if p.memory is None:
        return
    parts = "  ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f}" for k, v in p.memory.parts().items() if v)
    console.print(f"  memory (GiB, stage {p.memory.stage}, {p.memory.params:,} parameters): {parts}", highlight=False)
    t = p.time
    per_step = ", ".join(f"{k.replace('_', ' ')} {seconds(v)}" for k, v in t.parts().items() if v > 0.001 * t.step)
    console.print(f"  step {seconds(t.step)}, MFU {t.mfu:.1%}, {t.microbatches} micro-batches, bubble {t.bubble:.1%}; "
                  f"per step: {per_step}", highlight=False)


# ---- mzoo train --dry-run --------------------------------------------------------------------------------
def dry_run(cfg, layout, tcfg, rank: int, first: Optional[int], last: Optional[int], as_json: bool,
            device: str = "cpu") -> None:
    """Build rank `rank` of the layout on the meta device (no weights, no process group) and print its
    parameters and the planner's memory estimate for mzoo's engine on `device` ('cuda' or 'cpu')."""
    from mzoo.models import build_chunks
    from mzoo.parallel.state import ParallelState
    from mzoo.plan.costs import stages
    from mzoo.plan.layout import Layout
    from mzoo.plan.memory import stage_memory
    from mzoo.plan.profile import engine_profile

    world = layout.world_size
    if not 0 <= rank < world:
        raise UserError(f"--dry-run-rank {rank} is outside the {world} ranks of this layout; use 0 to {world - 1}.")
    state = ParallelState.for_rank(layout, rank)
    chunks = build_chunks(cfg, state, first=first, last=last, device="meta")
    params = [{"name": n, "shape": list(p.shape), "numel": p.numel()} for n, p in chunks.canonical_parameters()]
    plan_layout = Layout(tp=layout.tp, pp=layout.pp, dp=layout.dp, vpp=layout.vpp, ep=layout.ep, cp=layout.cp,
                           first=first, last=last)
    from mzoo.train.fit import settings_of

    settings = settings_of(tcfg)
    profile = engine_profile(tcfg.precision, layout.sequence_parallel, device)
    stage = stages(cfg, plan_layout)[state.pp_rank]
    mem = stage_memory(cfg, plan_layout, settings, profile, stage)
    coords = {"tp_rank": state.tp_rank, "cp_rank": state.cp_rank, "dp_rank": state.dp_rank, "pp_rank": state.pp_rank,
              "ep_rank": state.ep_rank, "edp_rank": state.edp_rank}
    count = sum(p["numel"] for p in params)
    if as_json:
        print_json({"dry_run": True, "model": cfg.name, "rank": rank, "world_size": world, "coordinates": coords,
                    "layout": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "dp": layout.dp, "ep": layout.ep,
                               "cp": layout.cp, "sequence_parallel": layout.sequence_parallel,
                               "first_stage_layers": first, "last_stage_layers": last},
                    "layers": list(stage.layers), "parameters": params, "count": count,
                    "memory": {"profile": profile.name, "device": device, **mem.as_dict()}})
        return
    where = ", ".join(f"{k} {v}" for k, v in coords.items())
    console.print(f"[bold]dry run[/]: rank {rank} of {world} ({where}); nothing allocated, nothing launched",
                  highlight=False)
    span = f"layers {stage.layers[0]}..{stage.layers[-1]} ({len(stage.layers)})" if stage.layers else "no layers"
    console.print(span, highlight=False)
    table = Table(title=f"{len(params)} parameter tensors, {count:,} elements")
    for col in ("name", "shape", "numel"):
        table.add_column(col, justify="right" if col == "numel" else "left")
    for p in params:
        table.add_row(p["name"], "x".join(map(str, p["shape"])), f"{p['numel']:,}")
    console.print(table)
    parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in mem.parts().items() if v)
    console.print(f"memory estimate ({profile.name}, mzoo's engine on {device}): {_size(mem.total)} = {parts}",
                  highlight=False)
