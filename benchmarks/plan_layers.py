"""Seconds and peak RSS of the planner's memory estimate as num_layers grows (issue 17, case 10).

Each row runs in its own child process (peak RSS: that child's ru_maxrss from os.wait4):
`memory()` of llama-tiny with `--layers` layers at pp=4 vpp=2 (the check `mzoo train` makes before it
allocates, and each layout `mzoo plan` ranks), counted per layer kind as mzoo does now, against the
named baseline: the same estimate with each stage's layers walked one by one (what the planner did
before; here with the per-layer type list built once, which is kinder to the walk than the old
code, which rebuilt it per layer). A last row times `mzoo plan`'s whole search of 8 GPUs per kind.

    .venv/bin/python benchmarks/plan_layers.py [--layers 1000 100000 1000000 10000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import sys, time
from mzoo.layout import Layout
from mzoo.plan.costs import Model, layer_blocks_of
from mzoo.plan.hardware import GPUS
from mzoo.plan.memory import memory
from mzoo.plan.profile import engine_profile
from mzoo.plan.search import plan
from mzoo.plan.settings import Settings
from mzoo.zoo import resolve

mode, layers = sys.argv[1], int(sys.argv[2])
cfg = resolve("llama-tiny").replace(num_layers=layers)

def walked(self, ranges):
    types = self.cfg.layer_types
    out = {}
    for r in ranges:
        for i in r:
            blocks = layer_blocks_of(types[i], self.cfg, self.cfg.is_moe_layer(i))
            out[blocks] = out.get(blocks, 0) + 1
    return list(out.items())

if mode == "walk":
    Model.kinds = walked
start = time.perf_counter()
if mode == "plan":
    plan(cfg, 8, Settings(4096, 512), GPUS["h100-80gb"])
else:
    memory(cfg, Layout(pp=4, vpp=2), Settings(4096, 512), engine_profile("bf16", False, "cuda")).total
print(time.perf_counter() - start)
"""


def measure(mode: str, layers: int, timeout: float) -> tuple[str, float]:
    """(seconds or 'timeout', peak RSS in MB) of one child."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(layers)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + timeout
    pid, usage = 0, None
    while time.monotonic() < end:
        pid, _, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    if not pid:
        p.kill()
        _, _, usage = os.wait4(p.pid, 0)
    out = p.stdout.read().strip() if p.stdout else ""
    return (f"{float(out):.3f}" if out else f"> {timeout:.0f} (killed)"), usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load {load:.1f}")
    print("| layers | memory(): walk each layer (baseline) s / MB | memory(): per kind s / MB | plan 8 GPUs, per kind s / MB |")
    print("| --- | --- | --- | --- |")
    for n in a.layers:
        walk = measure("walk", n, a.timeout)
        kinds = measure("kinds", n, a.timeout)
        search = measure("plan", n, a.timeout)
        print(f"| {n:,} | {walk[0]} / {walk[1]:.0f} | {kinds[0]} / {kinds[1]:.0f} | {search[0]} / {search[1]:.0f} |")


if __name__ == "__main__":
    main()
