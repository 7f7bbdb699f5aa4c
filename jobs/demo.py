"""`mzoo demo`: the main job end to end on an embedded default, with no network: make a tiny zoo
model, check it against transformers, convert it to Megatron TP2 PP2, train it there on 4 gloo
processes from data and a tokenizer made on the spot, and bring it back to Hugging Face."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
from mzoo.converters.hf import save_hf
from mzoo.data.prepare import PrepareConfig, prepare
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.jobs.verify import against_transformers, verify_sources
from mzoo.layout import Layout
from mzoo.models.canonical import random_canonical
from mzoo.params import count_params
from mzoo.tolerances import VERIFY_TOLERANCE
from mzoo.train.bpe import CORPUS, corpus_texts, train_bpe
from mzoo.zoo import get


@dataclass(frozen=True)
class DemoRequest:
    preset: str = "llama-tiny"
    steps: int = 30  # 0 skips training
    workdir: Optional[Path] = None  # keep the outputs here instead of a temporary folder


@dataclass
class DemoResult:
    ok: bool
    summary: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # why a step could not run at all


def _train(preset: str, root: Path, steps: int, start: Path, say: Callable[[str], None]) -> tuple[Path, list[float]]:
    """Tokenizer and indexed data from the shipped corpus, then `mzoo train` TP2 x PP2 on 4 processes."""
    cfg = get(preset).config
    tok = train_bpe(corpus_texts(), min(cfg.vocab_size, 1000), root / "tokenizer")
    (root / "data").mkdir(exist_ok=True)
    data = prepare(PrepareConfig([CORPUS], tok, str(root / "data" / "tiny_stories"), append_eod=True, overwrite=True))
    say(f"[bold]4.[/] tokenizer + indexed data from the shipped corpus: {data.documents} documents, "
        f"{data.tokens} tokens")
    trained, log = root / f"{preset}-trained", root / "train-log.jsonl"
    say(f"[bold]5.[/] train from the Megatron checkpoint, TP2 x PP2 on 4 gloo processes, {steps} steps")
    cmd = [sys.executable, "-m", "mzoo.cli.main", "train", preset, "--tp", "2", "--pp", "2",
           "--load", str(start), "--data", str(root / "data" / "tiny_stories"), "--split", "100,0,0",
           "--tokenizer", str(tok), "--steps", str(steps), "--seq-len", "64", "--global-batch", "16",
           "--micro-batch", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "3", "--save", str(trained),
           "--log-json", str(log), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"training failed: {err[0]}")
    return trained, [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def demo(req: DemoRequest, say: Callable[[str], None] = lambda text: None) -> DemoResult:
    """Run every step, saying what each found; `ok` only when every comparison matches and the loss fell."""
    preset = req.preset
    cfg = get(preset).config
    summary: dict[str, Any] = {"preset": preset}
    with tempfile.TemporaryDirectory(prefix="mzoo-demo-") as tmp:
        root = req.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        hf_dir, mc_dir = root / f"{preset}-hf", root / f"{preset}-megatron-tp2pp2"
        say(f"[bold]1.[/] init {preset} ({count_params(cfg).total:,} parameters) -> {hf_dir}")
        save_hf(cfg, random_canonical(cfg, seed=0), hf_dir, overwrite=True)
        parity = against_transformers(hf_dir)
        say(f"[bold]2.[/] transformers vs mzoo on it: max |Δlogits| = {parity.max_abs_diff:.2e} "
            f"(tolerance {VERIFY_TOLERANCE:g})")
        tp2pp2 = MegatronCheckpoint(layout=Layout(tp=2, pp=2))
        convert(open_source(hf_dir), mc_dir, Target("torch_dist", tp2pp2), overwrite=True)
        via_megatron = verify_sources(open_source(hf_dir), open_source(mc_dir))
        say(f"[bold]3.[/] hf->megatron (torch_dist, TP2 PP2): max |Δlogits| = {via_megatron.max_abs_diff:.2e}")
        summary.update(transformers_vs_mzoo=parity.as_dict(), hf_vs_megatron_tp2pp2=via_megatron.as_dict())
        ok = parity.match and via_megatron.match
        final = hf_dir
        if req.steps:
            try:
                trained, losses = _train(preset, root, req.steps, mc_dir, say)
            except RuntimeError as e:
                return DemoResult(False, summary, str(e))
            say(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f}")
            back = root / f"{preset}-trained-hf"
            convert(open_source(trained), back, Target("hf"), overwrite=True)
            round_trip = verify_sources(open_source(trained), open_source(back))
            say(f"[bold]6.[/] trained megatron->hf: max |Δlogits| = {round_trip.max_abs_diff:.2e} -> {back}")
            learned = losses[-1] < losses[0] - 0.5
            summary.update(losses=losses, trained_vs_hf=round_trip.as_dict(), learned=learned)
            ok = ok and round_trip.match and learned
            final = back
        summary.update(match=ok, final_hf_checkpoint=str(final) if req.workdir else None)
    return DemoResult(ok, summary)
