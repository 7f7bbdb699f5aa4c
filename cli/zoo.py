"""`mzoo zoo list|show`: browse the presets and what they cost."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from mzoo import zoo as zoo_lib
from mzoo.cli.common import console, escape, print_json, user_errors
from mzoo.config import ModelConfig
from mzoo.params import human

app = typer.Typer(help="Browse the model zoo: published presets and tiny test variants.", no_args_is_help=True)


def _summary(p: zoo_lib.Preset) -> dict:
    c: ModelConfig = p.config
    count, attention = p.count, "attention" in c.block_kinds
    return {
        "name": c.name,
        "family": c.family,
        "params": count.total,
        "active_params": count.active,
        "layers": c.num_layers,
        "hidden": c.hidden_size,
        "heads": c.num_attention_heads if attention else None,
        "groups": c.groups if attention else None,
        "experts": c.moe.num_experts if c.moe else None,
        "context": c.max_position_embeddings if c.position_embedding != "none" or attention else None,
        "published_params": p.published_params,
        "source": c.source,
    }


@app.command("list")
@user_errors
def list_(
    family: Optional[str] = typer.Option(None, "--family", "-f", help="Only this family (gpt, llama, mixtral, deepseek, mamba)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List presets with exact parameter counts.

    Example: mzoo zoo list --family llama
    """
    rows = [_summary(zoo_lib.get(n)) for n in zoo_lib.names(family)]
    if as_json:
        print_json(rows)
        return
    table = Table(title="mzoo zoo")
    for col in ("name", "family", "params", "active", "layers", "hidden", "heads/groups", "experts", "context"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for r in rows:
        heads = f"{r['heads']}/{r['groups']}" if r["heads"] else "-"
        table.add_row(r["name"], r["family"], human(r["params"]), human(r["active_params"]), str(r["layers"]),
                      str(r["hidden"]), heads, str(r["experts"] or "-"), str(r["context"] or "-"))
    console.print(table)


@app.command()
@user_errors
def show(
    name: str = typer.Argument(..., help="Preset name, e.g. llama3-8b."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Show a preset's full configuration and parameter counts.

    Example: mzoo zoo show llama3-8b
    """
    from dataclasses import asdict

    p = zoo_lib.get(name)
    recipe = {**asdict(p.recipe), "steps": p.recipe.steps} if p.recipe else None
    if as_json:
        print_json({**_summary(p), "config": p.config.to_dict(), "recipe": recipe})
        return
    s = _summary(p)
    console.print(f"[bold]{escape(name)}[/] ({s['family']}): {human(s['params'])} parameters"
                  + (f", {human(s['active_params'])} active per token" if s["active_params"] != s["params"] else ""))
    if s["source"]:
        console.print(f"source: {s['source']}", highlight=False, markup=False)
    console.print(p.config.to_yaml(), highlight=False, markup=False)
    if recipe:
        r = p.recipe
        console.print(f"recipe (what `mzoo train {name}` uses unless overridden): seq {r.seq_len}, global batch "
                      f"{r.global_batch}, micro batch {r.micro_batch}, lr {r.lr:g} -> {r.min_lr:g} {r.schedule}, "
                      f"warmup {r.warmup}, weight decay {r.weight_decay:g}"
                      + (f", {r.tokens:.3g} tokens = {r.steps:,} steps" if r.tokens else "")
                      + f"; source: {r.source}", highlight=False)
    else:
        d = zoo_lib.DEFAULTS
        console.print(f"recipe: none published; `mzoo train {name}` uses mzoo's small defaults (seq {d['seq_len']}, "
                      f"global batch {d['global_batch']}, {d['steps']} steps) unless overridden.", highlight=False)
