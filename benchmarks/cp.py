"""Benchmark: context parallelism (--cp 2) against one process on the same llama, per-rank peak memory
and tokens/s, at sequence S, 2S and 4S.

What one row runs: `world` processes (1, or N gloo ranks at cp=N), one thread each, each training the
same randomly initialised llama (default hidden 256, 4 layers, 4 heads / 2 query groups, SwiGLU ffn
688, vocab 4096, fp32) with mzoo's Trainer on mock tokens: micro batch 1, global batch 2 (two
micro-batches, gradient accumulation), `--steps` optimizer steps of which the first is warm-up. The
one-process rows use torch's SDPA (its fused CPU kernel: no [s, s] scores); the CP rows use mzoo's
tiled attention over the K/V all-gathered from both ranks (mzoo/parallel/blockwise.py).

Columns:
  peak MiB  the largest rank's peak RSS above its warmed-up baseline (VmHWM after writing 5 to
            /proc/self/clear_refs, once imports, the process group and a one-layer warm-up run are
            done), with glibc told to mmap every block above 64 KiB so that freed tensors leave
            the RSS (the method of tests/mzoo/test_plan.py's measured checks)
  estimate  the planner's engine-profile estimate for that layout (mzoo/plan/memory.py), MiB
  tok/s     tokens of the measured steps / their seconds (rank 0; the whole job's rate)
  vs 1p S   peak relative to the named baseline, one process at S, measured in the same run

Run:  .venv/bin/python benchmarks/cp.py [--seq-len 1024] [--steps 3] [--hidden 256] [--layers 4]
      [--rows 1p:1,1p:2,1p:4,cp2:1,cp2:2,cp2:4] [--json]
      (a row is LAYOUT[+RECOMPUTE]:MULTIPLE of --seq-len; LAYOUT is 1p or cpN, e.g. cp2, cp4; RECOMPUTE is
      selective or full, mzoo train's --recompute, e.g. cp2+full:4)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proctree import machine_info, print_markdown_table  # noqa: E402  (benchmarks/ is not a package)

MIB = 2**20


def model_spec(hidden: int, layers: int, seq: int) -> dict:
    return dict(name=f"bench-cp-{layers}x{hidden}", family="llama", vocab_size=4096, hidden_size=hidden,
                num_layers=layers, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=688,
                max_position_embeddings=max(4096, seq))


def child(spec: dict) -> None:
    """One rank: warm up, reset the peak, train, print {peak, tokens_per_s} (rank 0 also the loss)."""
    import torch
    import torch.distributed as dist

    from mzoo.config import ModelConfig
    from mzoo.data.gpt import MockGPTDataset
    from mzoo.layout import Layout
    from mzoo.models import build_chunks
    from mzoo.parallel.state import ParallelState
    from mzoo.train.trainer import TrainConfig, Trainer

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = Layout(cp=spec["cp"])
    if world > 1:
        dist.init_process_group("gloo")
        state = ParallelState.build(layout)
    else:
        state = ParallelState.single(layout)
    cfg, tcfg = ModelConfig.from_dict(spec["model"]), TrainConfig(**spec["train"])
    data = MockGPTDataset(cfg.vocab_size, tcfg.seq_len, 0)
    tiny = cfg.replace(hidden_size=64, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64, num_layers=1,
                       vocab_size=256)
    tiny_data = MockGPTDataset(256, 16, 0)
    warm = build_chunks(tiny, state)
    warm.init_weights(0)
    Trainer(warm, tiny, state, TrainConfig(**{**spec["train"], "seq_len": 16, "steps": 1}),
            lambda i: tiny_data[i]).train()
    del warm
    if world > 1:
        dist.barrier()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    model = build_chunks(cfg, state)
    model.init_weights(0)
    trainer = Trainer(model, cfg, state, tcfg, lambda i: data[i])
    trainer.train_step()  # warm-up step
    start = time.perf_counter()
    logs = trainer.train()
    seconds = time.perf_counter() - start
    tokens = len(logs) * tcfg.global_batch * tcfg.seq_len
    out = {"rank": state.rank, "peak": status("VmHWM") - base, "tokens_per_s": tokens / seconds,
           "loss": logs[-1].loss}
    print(json.dumps(out), flush=True)
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(layout: str, seq: int, args) -> dict:
    parallel, _, recompute = layout.partition("+")
    cp = int(parallel[2:]) if parallel.startswith("cp") else 1
    spec = {"cp": cp, "model": model_spec(args.hidden, args.layers, seq),
            "train": dict(seq_len=seq, micro_batch=1, global_batch=2, steps=args.steps, lr=3e-4, min_lr=3e-5,
                          warmup=1, recompute=recompute or "none")}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(cp))
    procs = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r)}) for r in range(cp)]
    ranks = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"row {layout}:{seq} failed:\n{err[-3000:]}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    from mzoo.config import ModelConfig
    from mzoo.layout import Layout
    from mzoo.plan.memory import memory
    from mzoo.plan.profile import engine_profile
    from mzoo.plan.settings import Settings

    settings = Settings(seq, 2, 1, distributed_optimizer=False, recompute=recompute or "none")
    estimate = memory(ModelConfig.from_dict(spec["model"]), Layout(cp=cp), settings, engine_profile("fp32")).total
    rank0 = next(r for r in ranks if r["rank"] == 0)
    return {"layout": layout, "seq_len": seq, "peak": max(r["peak"] for r in ranks), "estimate": estimate,
            "tokens_per_s": rank0["tokens_per_s"], "loss": rank0["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", default="1p:1,1p:2,1p:4,cp2:1,cp2:2,cp2:4")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    load = os.getloadavg()[0]
    rows = []
    for item in args.rows.split(","):
        layout, multiple = item.split(":")
        rows.append(run_row(layout, args.seq_len * int(multiple), args))
        print(f"done {item}: {rows[-1]['peak'] / MIB:.1f} MiB", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"machine": machine_info(load), "rows": rows}, indent=1))
        return
    base = next((r for r in rows if r["layout"] == "1p" and r["seq_len"] == args.seq_len), None)
    print(json.dumps(machine_info(load)))
    body = []
    for r in rows:
        parallel, _, recompute = r["layout"].partition("+")
        name = "one process" if parallel == "1p" else f"{parallel} (per rank)"
        name += f", recompute {recompute}" if recompute else ""
        ratio = f"{r['peak'] / base['peak']:.2f}" if base else "-"
        body.append([name, str(r["seq_len"]), f"{r['peak'] / MIB:.1f}", f"{r['estimate'] / MIB:.1f}",
                     f"{r['tokens_per_s']:.0f}", ratio, f"{r['loss']:.4f}"])
    print_markdown_table(["run", "seq", "peak MiB", "estimate MiB", "tok/s", "vs 1p S", "last loss"], body)


if __name__ == "__main__":
    main()
