"""Run a function on N real gloo ranks and collect the results.

Ranks are forked from a forkserver that has already imported torch, mzoo's engine and transformers
(once per test process), instead of spawning fresh interpreters that import them again for every
launch (~2-3 s a rank on this machine, ~150 launches in the suite). Each rank gets the caller's
environment at launch time. A test whose ranks must start from a fresh interpreter (an environment
variable read at process start, such as glibc's MALLOC_MMAP_THRESHOLD_) passes start="spawn"."""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port


PRELOAD = ["torch", "torch.distributed", "conftest", "dist", "mzoo.models", "mzoo.train.trainer",
           "mzoo.converters.hf", "transformers"]


def _context(start: str):
    ctx = mp.get_context(start)
    if start == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # plain pickle: tensors travel as bytes, not as shared file descriptors that vanish when this
        # process exits before the parent reads them
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn: Callable, world: int, *args: Any, timeout: float = 300, start: str = "forkserver") -> list[Any]:
    """fn(rank, world, *args) on `world` gloo ranks; results by rank; raises on any rank's error.
    `fn` must be importable (a module-level function in a test module)."""
    ctx = _context(start)
    queue = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, env)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    except queue_mod.Empty:
        raise AssertionError(f"distributed test timed out after {timeout}s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
