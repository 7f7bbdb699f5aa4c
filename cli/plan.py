"""`mzoo plan`: parse (including --check's layout), call mzoo.jobs.plan, print the ranked table or the
checked layout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from mzoo import validate as V
from mzoo.cli import options as O
from mzoo.cli.common import console, escape, print_json, user_errors
from mzoo.errors import UserError
from mzoo.layout import Layout

if TYPE_CHECKING:  # the jobs import torch: only a command that runs loads them
    from mzoo.jobs.plan import PlanResult

ENGINES = {"mzoo": "mzoo's engine", "megatron": "Megatron-Core + TE"}
COMPARED = ("engine", "valid", "feasible", "verdict", "problems", "memory_gb", "mfu", "step_s")


CHECK_KEYS = ("tp", "pp", "vpp", "ep", "etp", "cp", "dp", "first", "last")


def parse_check(text: str, gpus: int) -> Layout:
    """'tp=4,pp=4,ep=8' -> the planner's Layout; dp defaults to gpus / (tp * pp * cp)."""
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
                  first_stage_layers=values.get("first"), last_stage_layers=values.get("last"))


@user_errors
def plan(
    model: str = typer.Argument(..., help="Zoo preset (e.g. llama3-70b) or a model YAML file."),
    gpus: int = O.option(..., "--gpus", help="GPUs in total.", rule=V.POSITIVE),
    gpu: list[str] = typer.Option(["h100-80gb"], "--gpu", help="GPU type, repeat to compare: h100-80gb, "
                                  "h200, a100-80gb, b200, ... (docs/plan.md)."),
    gpus_per_node: int = O.option(8, "--gpus-per-node", help="GPUs per node (NVLink domain).", rule=V.POSITIVE),
    seq_len: Optional[int] = O.option(None, "--seq-len",
                                          help="Tokens per sample (default: min(4096, the model's context)).",
      rule=V.POSITIVE),
    global_batch: Optional[int] = O.option(None, "--global-batch",
                                               help="Samples per step (default: about 4M tokens).", rule=V.POSITIVE),
    micro_batch: int = O.option(1, "--micro-batch", help="Samples per micro-batch per data-parallel rank.",
                                rule=V.POSITIVE),
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
    headroom: float = O.option(0.05, "--headroom", help="Share of each GPU's memory kept free for the allocator's "
                                   "fragmentation and caches (the runtime's fixed memory is counted apart).",
      rule=V.FRACTION),
    top: int = O.option(10, "--top", help="Show the best K layouts per GPU type.", rule=V.POSITIVE),
    check: Optional[str] = typer.Option(None, "--check", help="Evaluate one layout, e.g. tp=4,pp=4,ep=8 "
                                        "(keys: tp pp vpp ep etp cp dp first last)."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print JSON: settings, layouts (memory, MFU, breakdowns), explanation."),
    lora_rank: int = O.option(0, "--lora-rank", help="Plan a LoRA finetune of this rank: the base frozen, only the "
                              "adapters' gradients and optimizer state (memory; step time stays full training's).",
                              rule=V.NON_NEGATIVE),
    lora_targets: str = typer.Option("qkv,proj,fc1,fc2", "--lora-targets", help="The linears LoRA adapts."),
) -> None:
    """Rank the parallel layouts (tp, pp, vpp, ep, cp, dp) that fit a model on N GPUs by estimated step
    time, with a per-GPU memory breakdown and MFU, and say why the best one wins (docs/plan.md).

    By default the layouts are ranked for mzoo's own engine (what `mzoo train` would use and need),
    with Megatron-Core + Transformer Engine's estimate beside each; --engine megatron ranks by that.

    Example: mzoo plan llama3-70b --gpus 64 --seq-len 8192 --global-batch 512
             mzoo plan deepseek-v3 --gpus 1024 --engine megatron --recompute selective --check tp=2,pp=16,ep=64,etp=1,first=4,last=1
             mzoo plan llama3-8b --gpus 1 --lora-rank 16 --recompute selective
    Exit status: 0 when --check's layout is valid and fits (on every --gpu), 1 when it is valid but
    does not fit, 2 when it is not valid for this model and GPU count or --check is malformed.
    """
    from mzoo.jobs.plan import PlanRequest, plan as run

    layout = parse_check(check, gpus) if check is not None else None
    request = PlanRequest(model, gpus, tuple(gpu), gpus_per_node, seq_len, global_batch, micro_batch, recompute,
                          distributed_optimizer, fp8, grad_reduce_in_fp32, engine, headroom, top, layout, lora_rank,
                          lora_targets)
    result = run(request)
    _show(result, as_json)
    if result.checked and not result.feasible:
        raise typer.Exit(2 if not all(p.valid for p in result.plans) else 1)


def _settings_dict(settings) -> dict:
    return {"seq_len": settings.seq_len, "global_batch": settings.global_batch, "micro_batch": settings.micro_batch,
            "recompute": settings.recompute, "distributed_optimizer": settings.distributed_optimizer,
            "fp8": settings.fp8, "grad_reduce_in_fp32": settings.grad_fp32, "gpus_per_node": settings.gpus_per_node,
            "headroom": settings.headroom, "lora_rank": settings.lora_rank}


def _show(result: "PlanResult", as_json: bool) -> None:
    from mzoo.plan.explain import seconds

    cfg, gpus, settings, plans, other, why, check = (result.cfg, result.gpus, result.settings, result.plans,
                                                      result.other, result.why, result.checked)

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
    console.print(f"[bold]{escape(cfg.name or 'model')}[/] on {gpus} GPUs ({s.gpus_per_node} per node): seq {s.seq_len}, "
                  f"global batch {s.global_batch}, micro batch {s.micro_batch}, recompute {s.recompute}, "
                  f"{'distributed' if s.distributed_optimizer else 'replicated'} optimizer, "
                  f"{'fp32' if s.grad_fp32 else 'bf16'} gradients{', fp8' if s.fp8 else ''}"
                  f"{f', LoRA rank {s.lora_rank} (base frozen)' if s.lora_rank else ''}", highlight=False)
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
                          f"{p.time.tokens_per_s / p.layout.world_size:,.0f}", f"{p.time.bubble:.1%}",
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
