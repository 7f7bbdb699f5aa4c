"""`mzoo demo`: the embedded end-to-end run on a tiny model made on the spot."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from mzoo.cli.common import console, print_json, quiet_transformers, user_errors
from mzoo.converters.hf import random_canonical, save_hf
from mzoo.converters.verify import TOLERANCE, against_transformers
from mzoo.params import count_params
from mzoo.zoo import get


@user_errors
def demo(
    preset: str = typer.Option("llama-tiny", help="Zoo preset to build (a -tiny one runs in seconds)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep the outputs here instead of a temporary folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Build a tiny zoo model, write it as a Hugging Face checkpoint, and check mzoo against transformers.

    The run is end to end and needs no network: the model is made on the spot.

    Example: mzoo demo --preset gpt-tiny
    """
    cfg = get(preset).config
    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="mzoo-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        hf_dir = root / f"{preset}-hf"
        say = (lambda *_: None) if as_json else console.print
        say(f"[bold]1.[/] init {preset} ({count_params(cfg).total:,} parameters) -> {hf_dir}")
        save_hf(cfg, random_canonical(cfg, seed=0), hf_dir, overwrite=True)
        say("[bold]2.[/] load it with transformers and with mzoo, compare logits (fp32)")
        parity = against_transformers(hf_dir)
        ok = parity.match
        summary = {"preset": preset, "hf_checkpoint": str(hf_dir), "max_abs_diff": parity.max_abs_diff,
                   "argmax_agreement": parity.argmax_agreement, "match": ok}
        if as_json:
            print_json(summary)
        else:
            verdict = "[green]match[/]" if ok else "[red]MISMATCH[/]"
            console.print(f"   max |Δlogits| = {parity.max_abs_diff:.2e} (tolerance {TOLERANCE:g}), "
                          f"argmax agreement {parity.argmax_agreement:.1%}: {verdict}")
    if not ok:
        raise typer.Exit(1)
