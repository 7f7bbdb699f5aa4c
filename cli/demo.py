"""`mzoo demo`: the embedded end-to-end run on a tiny model made on the spot."""

from __future__ import annotations

import json
import subprocess
import sys
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
    steps: int = typer.Option(30, help="Training steps (0 skips training)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep the outputs here instead of a temporary folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Make a tiny zoo model, check it against transformers, convert it to Megatron TP2 PP2, train it there
    on 4 gloo processes, and bring it back to Hugging Face.

    The run is end to end and needs no network: the model, tokenizer and data are made on the spot from
    a small corpus mzoo ships.

    Example: mzoo demo --steps 30
    """
    from mzoo.ckpt.megatron import MegatronLayout
    from mzoo.converters.hf import random_canonical, save_hf
    from mzoo.converters.pipeline import Target, convert, open_source
    from mzoo.converters.verify import against_transformers, verify_sources
    from mzoo.data.prepare import PrepareConfig, prepare
    from mzoo.train.bpe import CORPUS, train_bpe, corpus_texts

    cfg = get(preset).config
    quiet_transformers()
    say = (lambda *_: None) if as_json else console.print
    summary: dict = {"preset": preset}
    with tempfile.TemporaryDirectory(prefix="mzoo-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        hf_dir, mc_dir = root / f"{preset}-hf", root / f"{preset}-megatron-tp2pp2"
        say(f"[bold]1.[/] init {preset} ({count_params(cfg).total:,} parameters) -> {hf_dir}")
        save_hf(cfg, random_canonical(cfg, seed=0), hf_dir, overwrite=True)
        parity = against_transformers(hf_dir)
        say(f"[bold]2.[/] transformers vs mzoo on it: max |Δlogits| = {parity.max_abs_diff:.2e} "
            f"(tolerance {TOLERANCE:g})")
        convert(open_source(hf_dir), mc_dir, Target("torch_dist", MegatronLayout(tp=2, pp=2)), overwrite=True)
        via_megatron = verify_sources(open_source(hf_dir), open_source(mc_dir))
        say(f"[bold]3.[/] hf->megatron (torch_dist, TP2 PP2): max |Δlogits| = {via_megatron.max_abs_diff:.2e}")
        summary.update(transformers_vs_mzoo=parity.as_dict(), hf_vs_megatron_tp2pp2=via_megatron.as_dict())
        ok = parity.match and via_megatron.match
        start = hf_dir
        if steps:
            tok = train_bpe(corpus_texts(), min(cfg.vocab_size, 1000), root / "tokenizer")
            (root / "data").mkdir(exist_ok=True)
            data = prepare(PrepareConfig([CORPUS], tok, str(root / "data" / "tiny_stories"), append_eod=True,
                                         overwrite=True))
            say(f"[bold]4.[/] tokenizer + indexed data from the shipped corpus: {data.documents} documents, "
                f"{data.tokens} tokens")
            trained, log = root / f"{preset}-trained", root / "train-log.jsonl"
            say(f"[bold]5.[/] train from the Megatron checkpoint, TP2 x PP2 on 4 gloo processes, {steps} steps")
            cmd = [sys.executable, "-m", "mzoo.cli.main", "train", preset, "--tp", "2", "--pp", "2",
                   "--load", str(mc_dir), "--data", str(root / "data" / "tiny_stories"), "--split", "100,0,0", "--tokenizer", str(tok),
                   "--steps", str(steps), "--seq-len", "64", "--global-batch", "16", "--micro-batch", "2",
                   "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "3", "--save", str(trained),
                   "--log-json", str(log), "--json"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
                raise typer.Exit(_fail(f"training failed: {err[0]}", as_json))
            losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
            say(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f}")
            back = root / f"{preset}-trained-hf"
            convert(open_source(trained), back, Target("hf"), overwrite=True)
            round_trip = verify_sources(open_source(trained), open_source(back))
            say(f"[bold]6.[/] trained megatron->hf: max |Δlogits| = {round_trip.max_abs_diff:.2e} -> {back}")
            learned = losses[-1] < losses[0] - 0.5
            summary.update(losses=losses, trained_vs_hf=round_trip.as_dict(), learned=learned)
            ok = ok and round_trip.match and learned
            start = back
        summary.update(match=ok, final_hf_checkpoint=str(start) if workdir else None)
        if as_json:
            print_json(summary)
        else:
            console.print("[green]all checks pass[/]" if ok else "[red]a check failed[/]")
    if not ok:
        raise typer.Exit(1)


def _fail(message: str, as_json: bool) -> int:
    if as_json:
        print_json({"match": False, "error": message})
    else:
        console.print(f"[red]{message}[/]")
    return 1
