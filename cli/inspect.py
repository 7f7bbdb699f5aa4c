"""`mzoo inspect`: what a checkpoint is, without loading its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mzoo.cli import options as O
from mzoo.cli.common import console, escape, print_json, user_errors
from mzoo.params import human


@user_errors
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint folder (Hugging Face or Megatron, any format)."),
    trust_pickle: bool = O.TRUST_PICKLE,
    vocab_size: Optional[int] = O.VOCAB_SIZE,
    check: bool = typer.Option(False, "--check", help="Read every file and compare it with the checksums in mzoo.yaml; exit 1 on a problem."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show format, model, layout, dtype, parameter count and files of a checkpoint.

    Example: mzoo inspect ./llama-mcore --json
             mzoo inspect ./llama-mcore --check   (sizes and CRC-32 of every file)
    """
    from mzoo.jobs.inspect import describe

    info = describe(path, trust_pickle, vocab_size, check)
    if as_json:
        print_json(info)
        if check and info["problems"]:
            raise typer.Exit(1)
        return
    m = info["model"]
    console.print(f"[bold]{escape(str(path))}[/]: {info['format']}"
                  + (f", iteration {info['iteration']}" if info["iteration"] is not None else ""), highlight=False)
    console.print(f"  model   {m['family']}: {human(info['num_params'])} parameters, {m['num_layers']} layers, "
                  f"hidden {m['hidden_size']}, vocab {info['vocab_size']}", highlight=False)
    console.print(f"  layout  tp={info['tp']} pp={info['pp']} vpp={info['vpp']} ep={info['ep']}"
                  + (f" spec={info['spec']}" if info["spec"] else "") + f", dtype {info['dtype']}"
                  + (f" (stored {info['quantization'].upper()}, read dequantized)" if info["quantization"] else ""),
                  highlight=False)
    console.print(f"  files   {len(info['files'])} files, {info['total_bytes'] / 1e9:.3f} GB", highlight=False)
    for p in info["problems"]:
        console.print(f"  [red]problem[/] {escape(str(p))}", highlight=False)
    for p in info["leftovers"]:
        console.print(f"  [yellow]leftover[/] {escape(p)}: an interrupted run's temporary (the next write to it "
                      "removes it; or remove it yourself)", highlight=False)
    if check:
        if info["problems"]:
            raise typer.Exit(1)
        verdict = "every file matches mzoo.yaml" if info["checked"] else "no checksums recorded (not written by mzoo)"
        console.print(f"  check   {verdict}", highlight=False)
