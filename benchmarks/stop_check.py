"""Benchmark: what the per-step stop check costs training (issue 17, case 8).

Each training step ends with `mzoo.train.run.agreed_stop`: one all-reduce (MAX) of an int32 over the
world, so that every rank stops after the same step when any of them got SIGTERM/SIGINT (plus a
`kill(pid, 0)` that notices a dead parent). This measures, on CPU gloo processes:

  check      median ms of one agreed_stop call, over 300 calls after 20 warm-up calls, on each rank
             (the slowest rank's median is shown)
  step       median ms of one real training step of llama-tiny at dp=N (`mzoo train llama-tiny
             --mock-data --dp N --steps 12 --seq-len 32 --log-json`, steps 3..12), the baseline
  overhead   check / step

Usage: .venv/bin/python benchmarks/stop_check.py [--worlds 2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MZOO = str(Path(sys.executable).with_name("mzoo"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from mzoo.signals import StopFlag
    from mzoo.train.run import agreed_stop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    flag, device = StopFlag(), torch.device("cpu")
    for _ in range(20):
        agreed_stop(flag, device)
    times = []
    for _ in range(300):
        start = time.perf_counter()
        agreed_stop(flag, device)
        times.append(time.perf_counter() - start)
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(statistics.median(times) * 1e3))


def check_ms(world: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _free_port(), out), nprocs=world, join=True)
        return max(json.loads(Path(out, f"{r}.json").read_text()) for r in range(world))


def step_ms(world: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        log = Path(out, "log.jsonl")
        subprocess.run([MZOO, "train", "llama-tiny", "--mock-data", "--dp", str(world), "--steps", "12",
                        "--seq-len", "32", "--log-json", str(log), "--json"], cwd=out, check=True,
                       capture_output=True)
        rows = [json.loads(line) for line in log.read_text().splitlines()][2:]
        return statistics.median(8 * 32 / r["tokens_per_s"] * 1e3 for r in rows)  # global batch 8 x seq 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="2,4")
    args = parser.parse_args()
    print(f"{'processes':>9}  {'check ms':>9}  {'step ms':>9}  {'overhead':>8}")
    for world in map(int, args.worlds.split(",")):
        check, step = check_ms(world), step_ms(world)
        print(f"{world:>9}  {check:>9.3f}  {step:>9.1f}  {check / step:>8.2%}")


if __name__ == "__main__":
    main()
