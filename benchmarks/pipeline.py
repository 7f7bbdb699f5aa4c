"""Benchmark: the pipeline schedules' memory and overlap (issue 18, item 2): outputs freed once sent
(Megatron's deallocate_pipeline_outputs) and overlapped p2p in the interleaved schedule (Megatron's
overlap_p2p_comm).

Two gloo processes, pp=2 (1F1B) and pp=2 vpp=2 (interleaved), one training step of a llama-shaped
model (hidden 1024, 4 layers, seq 1024, micro-batch 2, 8 micro-batches) straight through the
engine's schedule, fp32 on this CPU. Each rank reports its peak RSS growth during its first step (ru_maxrss
after the step minus before it; weights, main grads and optimizer state are allocated before) and
the step time. Baseline: the same step with the outputs kept (the
schedule's `_free_output` replaced by a no-op in this process, what the engine did before). Expected
saving on stage 0: one [seq, batch, hidden] fp32 output (8 MiB here) per micro-batch in flight
(2 for 1F1B, 5 interleaved). The interleaved schedule also runs with its p2p blocking (overlap_p2p
off, the engine's exchange before) as the baseline for the overlapped one. The losses must be equal.

Usage: .venv/bin/python benchmarks/pipeline.py
"""

from __future__ import annotations

import functools
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, vpp: int, keep: bool, blocking: bool, out: str) -> None:
    from mzoo.config import ModelConfig
    from mzoo.layout import Layout
    from mzoo.models import build_chunks
    from mzoo.parallel import schedules
    from mzoo.parallel.state import ParallelState
    from mzoo.train.trainer import TrainConfig, Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if keep:
        schedules._free_output = lambda output: None  # the baseline: outputs kept until their backward
    if blocking:  # the baseline: every exchange waited for where it is posted
        schedules.forward_backward_pipelining_with_interleaving = functools.partial(
            schedules.forward_backward_pipelining_with_interleaving, overlap_p2p=False)
    cfg = ModelConfig(family="llama", vocab_size=2000, hidden_size=1024, num_layers=4, num_attention_heads=8,
                      num_query_groups=4, ffn_hidden_size=2048, max_position_embeddings=1024)
    state = ParallelState.build(Layout(pp=2, vpp=vpp))
    model = build_chunks(cfg, state)
    model.init_weights(seed=1)
    tcfg = TrainConfig(seq_len=1024, micro_batch=2, global_batch=16, steps=2, warmup=0)

    def sample(i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, cfg.vocab_size, (tcfg.seq_len + 1,), generator=torch.Generator().manual_seed(i))
        return {"tokens": ids[:-1], "labels": ids[1:]}

    trainer = Trainer(model, cfg, state, tcfg, sample)  # optimizer state and main grads allocated here
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    log = trainer.train_step()
    seconds = time.perf_counter() - start
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    Path(out, f"{rank}.json").write_text(json.dumps({"grew_mb": grew / 1024, "s": seconds, "loss": log.loss}))
    dist.destroy_process_group()


def measure(vpp: int, keep: bool, blocking: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, _port(), vpp, keep, blocking, out), nprocs=2, join=True)
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(2)]


def main() -> None:
    print(f"{'schedule':>12}  {'outputs':>7}  {'p2p':>8}  {'stage0 peak+ MB':>15}  {'stage1 peak+ MB':>15}  "
          f"{'step s':>6}  loss")
    rows = [(1, "1F1B", True, False), (1, "1F1B", False, False), (2, "interleaved", True, True),
            (2, "interleaved", False, True), (2, "interleaved", False, False)]
    for vpp, name, keep, blocking in rows:
        r = measure(vpp, keep, blocking)
        p2p = "blocking" if blocking or vpp == 1 else "overlap"
        print(f"{name:>12}  {'kept' if keep else 'freed':>7}  {p2p:>8}  {r[0]['grew_mb']:>15.0f}  "
              f"{r[1]['grew_mb']:>15.0f}  {max(x['s'] for x in r):>6.2f}  {r[1]['loss']:.6f}")


if __name__ == "__main__":
    sys.exit(main())
