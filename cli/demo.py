"""`mzoo demo`: the embedded end-to-end run on a tiny model made on the spot."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mzoo import validate as V
from mzoo.cli import options as O
from mzoo.cli.common import console, escape, print_json, quiet_transformers, user_errors


@user_errors
def demo(
    preset: str = typer.Option("llama-tiny", help="Zoo preset to build (a -tiny one runs in seconds)."),
    steps: int = O.option(30, help="Training steps (0 skips training).", rule=V.NON_NEGATIVE),
    workdir: Optional[Path] = typer.Option(None, help="Keep the outputs here instead of a temporary folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Make a tiny zoo model, check it against transformers, convert it to Megatron TP2 PP2, train it there
    on 4 gloo processes, and bring it back to Hugging Face.

    The run is end to end and needs no network: the model, tokenizer and data are made on the spot from
    a small corpus mzoo ships.

    Example: mzoo demo --steps 30
    """
    from mzoo.jobs.demo import DemoRequest, demo as run

    quiet_transformers()
    result = run(DemoRequest(preset, steps, workdir), (lambda text: None) if as_json else console.print)
    if result.error is not None:
        raise typer.Exit(_fail(result.error, as_json))
    if as_json:
        print_json(result.summary)
    else:
        console.print("[green]all checks pass[/]" if result.ok else "[red]a check failed[/]")
    if not result.ok:
        raise typer.Exit(1)


def _fail(message: str, as_json: bool) -> int:
    if as_json:
        print_json({"match": False, "error": message})
    else:
        console.print(f"[red]{escape(message)}[/]")
    return 1
