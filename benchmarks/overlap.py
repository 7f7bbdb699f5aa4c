"""Benchmark: overlapping the data-parallel traffic with compute (issue 18, item 1).

`mzoo train` at dp=2 (two gloo processes on this CPU, distributed optimizer) of a llama-shaped model
big enough for its gradients to take real time to reduce-scatter (hidden 512, 4 layers, vocabulary
8000: 21M parameters, 84 MB of fp32 gradients per step), three ways:

  plain      every bucket reduce-scattered, then all-gathered, inside the optimizer step (baseline)
  grad       --overlap-grad-reduce: buckets start their reduce-scatter inside the backward
  grad+param --overlap-grad-reduce --overlap-param-gather: the all-gathers also run under the next
             forward

Each row is its own `mzoo train` process tree started by `/usr/bin/time -f %M` (peak RSS of the
biggest process: one rank), median step time over steps 3..N from the trainer's tokens/s. The
losses of the three runs are compared: they must be equal (the overlap changes no number).

Usage: .venv/bin/python benchmarks/overlap.py [--steps 12] [--bucket 4000000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MZOO = str(Path(sys.executable).with_name("mzoo"))
MODEL = ["--override", "hidden_size=512", "--override", "num_layers=4", "--override", "ffn_hidden_size=1408",
         "--override", "vocab_size=8000", "--override", "num_attention_heads=8", "--override", "num_query_groups=4"]
ROWS = {"plain": [], "grad": ["--overlap-grad-reduce"],
        "grad+param": ["--overlap-grad-reduce", "--overlap-param-gather"]}


def run(flags: list[str], steps: int, bucket: int, seq: int, micro: int, batch: int) -> tuple[float, float, list]:
    with tempfile.TemporaryDirectory() as out:
        log = Path(out, "log.jsonl")
        cmd = ["/usr/bin/time", "-f", "%M", MZOO, "train", "llama-tiny", *MODEL, "--mock-data", "--dp", "2",
               "--distributed-optimizer", "--steps", str(steps), "--seq-len", str(seq), "--micro-batch", str(micro),
               "--global-batch", str(batch), "--log-json", str(log), *flags]
        proc = subprocess.run([*cmd, "--ddp-bucket-size", str(bucket)], cwd=out, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        step_ms = statistics.median(batch * seq / r["tokens_per_s"] * 1e3 for r in rows[2:])
        return step_ms, peak_mb, [r["loss"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--bucket", type=int, default=4_000_000, help="gradient bucket elements")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args()
    results = {name: run(flags, args.steps, args.bucket, args.seq_len, args.micro_batch, args.global_batch)
               for name, flags in ROWS.items()}
    base = results["plain"][0]
    print(f"{'run':>10}  {'step ms':>8}  {'vs plain':>8}  {'peak RSS MB':>11}  losses equal")
    for name, (ms, peak, losses) in results.items():
        print(f"{name:>10}  {ms:>8.1f}  {ms / base:>8.2f}  {peak:>11.0f}  {losses == results['plain'][2]}")


if __name__ == "__main__":
    main()
