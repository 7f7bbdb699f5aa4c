"""`mzoo demo`: the embedded end-to-end run on a tiny model made on the spot."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from mzoo.tolerances import VERIFY_TOLERANCE as TOLERANCE
from mzoo.cli.common import console, print_json, quiet_transformers, user_errors
from mzoo.params import count_params
from mzoo.zoo import get


@user_errors
def demo(
    preset: str = typer.Option("llama-tiny", help="Zoo preset to build (a -tiny one runs in seconds)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep the outputs here instead of a temporary folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Build a tiny zoo model, check it against transformers, and round-trip it through Megatron TP2 PP2.

    The run is end to end and needs no network: the model is made on the spot.

    Example: mzoo demo --preset gpt-tiny
    """
    from mzoo.ckpt.megatron import MegatronLayout
    from mzoo.converters.hf import random_canonical, save_hf
    from mzoo.converters.pipeline import Target, convert, open_source
    from mzoo.converters.verify import against_transformers, verify_sources
    cfg = get(preset).config
    quiet_transformers()
    say = (lambda *_: None) if as_json else console.print
    with tempfile.TemporaryDirectory(prefix="mzoo-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        hf_dir, mc_dir, back_dir = root / f"{preset}-hf", root / f"{preset}-megatron-tp2pp2", root / f"{preset}-hf-back"
        say(f"[bold]1.[/] init {preset} ({count_params(cfg).total:,} parameters) -> {hf_dir}")
        save_hf(cfg, random_canonical(cfg, seed=0), hf_dir, overwrite=True)
        say("[bold]2.[/] transformers vs mzoo on the Hugging Face checkpoint (fp32 logits)")
        parity = against_transformers(hf_dir)
        say(f"   max |Δlogits| = {parity.max_abs_diff:.2e} (tolerance {TOLERANCE:g})")
        say(f"[bold]3.[/] convert hf->megatron (torch_dist, TP2 PP2) -> {mc_dir}")
        convert(open_source(hf_dir), mc_dir, Target("torch_dist", MegatronLayout(tp=2, pp=2)), overwrite=True)
        say(f"[bold]4.[/] convert megatron->hf -> {back_dir}")
        convert(open_source(mc_dir), back_dir, Target("hf"), overwrite=True)
        say("[bold]5.[/] verify: original vs Megatron copy vs round trip (same tokens, logits)")
        via_megatron = verify_sources(open_source(hf_dir), open_source(mc_dir))
        round_trip = verify_sources(open_source(hf_dir), open_source(back_dir))
        ok = parity.match and via_megatron.match and round_trip.match
        summary = {"preset": preset, "transformers_vs_mzoo": parity.as_dict(),
                   "hf_vs_megatron_tp2pp2": via_megatron.as_dict(), "hf_vs_round_trip": round_trip.as_dict(),
                   "match": ok}
        if as_json:
            print_json(summary)
        else:
            for label, c in (("megatron copy", via_megatron), ("round trip", round_trip)):
                say(f"   {label}: max |Δlogits| = {c.max_abs_diff:.2e}, argmax agreement {c.argmax_agreement:.1%}")
            console.print("[green]all match[/]" if ok else "[red]MISMATCH[/]")
    if not ok:
        raise typer.Exit(1)
