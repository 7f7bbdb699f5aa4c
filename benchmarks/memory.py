"""Peak memory per parameter of mzoo's engine: bf16 + the distributed optimizer on 2 gloo ranks.

Each rank imports everything and warms the training path up on a tiny model, records its RSS (the
runtime), resets its peak (/proc/self/clear_refs), then builds a llama of about 200M parameters and
trains it two steps; it reports its peak RSS. The table holds, per engine, the peak, the peak above
the runtime in bytes per parameter, and that against Megatron's budget: 2 (bf16 weights) + 4 (fp32
main grads) + 12 / dp (fp32 master, Adam m, v) bytes per parameter, plus the same runtime.

Rows: this checkout, and with --baseline REPO a second checkout (e.g. a git worktree of the commit
before the memory work, 3831692) measured in the same run. Run it with the project's venv:

    .venv/bin/python benchmarks/memory.py [--baseline ../mzoo-3831692] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proctree import print_markdown_table  # noqa: E402

CHILD = r"""
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from mzoo.config import ModelConfig
from mzoo.models import build_chunks
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer
import mzoo
if os.path.exists(os.path.join(os.path.dirname(mzoo.__file__), "layout.py")):
    from mzoo.layout import Layout
    from mzoo.data.gpt import MockGPTDataset
else:  # a checkout from before the architecture step (the --baseline one); asked by file, because the
    # project's editable install would hand it this checkout's new modules
    from mzoo.config import ParallelConfig as Layout
    from mzoo.train.data import MockGPTDataset

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

spec = json.loads(sys.argv[1])
dist.init_process_group("gloo")
world = dist.get_world_size()
state = ParallelState.build(Layout(dp=world))
cfg, tcfg = ModelConfig.from_dict(spec["model"]), TrainConfig(**spec["train"])
tiny = cfg.replace(hidden_size=64, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64, num_layers=1,
                   vocab_size=256)
warm = build_chunks(tiny, state, dtype=torch.bfloat16)
warm.init_weights(0)
tiny_data = MockGPTDataset(256, 16, 0)
Trainer(warm, tiny, state, TrainConfig(**{**spec["train"], "seq_len": 16, "micro_batch": 1,
                                          "global_batch": 2 * world, "steps": 1}), lambda i: tiny_data[i]).train()
del warm
dist.barrier()
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
data = MockGPTDataset(cfg.vocab_size, tcfg.seq_len, 0)
model = build_chunks(cfg, state, dtype=torch.bfloat16)
model.init_weights(0)
Trainer(model, cfg, state, tcfg, lambda i: data[i]).train()
n = sum(p.numel() for p in model.parameters())
import mzoo
out = {"rank": dist.get_rank(), "base": base, "peak": status("VmHWM"), "params": n, "imported": mzoo.__file__}
open(os.path.join(spec["out"], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(out))
dist.destroy_process_group()
"""


ROOMS = {"models": "models", "converters": "converters", "cli": "cli", "zoo": "zoo"}  # pyproject's package-dir


def package_tree(repo: Path, where: Path) -> Path:
    """`mzoo` as the installed package lays it out (models/, converters/, cli/, zoo/ inside it), as
    symlinks into `repo`, so any checkout imports without being installed."""
    pkg = where / "mzoo"
    pkg.mkdir(parents=True)
    for entry in (repo / "mzoo").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in ROOMS.items():
        (pkg / name).symlink_to(repo / folder)
    return where


def measure(repo: Path, spec: dict, python: str) -> list[dict]:
    """Run CHILD on 2 gloo ranks importing mzoo from `repo`; each rank's numbers."""
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "child.py"
        script.write_text(CHILD)
        path = package_tree(repo, Path(out) / "pkg")
        # ONEDNN_MAX_CPU_ISA: oneDNN's AMX / AVX512-BF16 bf16 GEMMs keep reordered weight copies its AVX2
        # kernels do not (a CPU backend's scratch): every machine measures with the same kernels
        env = dict(os.environ, PYTHONPATH=str(path), MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
                   ONEDNN_MAX_CPU_ISA="AVX2")
        spec = {**spec, "out": out}
        proc = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(script), json.dumps(spec)], env=env, cwd=out, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"measuring {repo} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another mzoo checkout to measure in the same run")
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    model = dict(name="llama-200m", family="llama", vocab_size=32000, hidden_size=1024, num_layers=args.layers,
                 num_attention_heads=16, num_query_groups=4, ffn_hidden_size=2816, max_position_embeddings=2048)
    train = dict(seq_len=128, micro_batch=1, global_batch=4, steps=2, precision="bf16", distributed_optimizer=True)
    spec = {"model": model, "train": train}
    repos = [("mzoo (this checkout)", Path(__file__).resolve().parents[1])]
    if args.baseline:
        repos.append((f"mzoo at {args.baseline.name}", args.baseline.resolve()))
    rows = []
    for label, repo in repos:
        for r in measure(repo, spec, sys.executable):
            n, runtime, peak = r["params"], r["base"], r["peak"]
            above = (peak - runtime) / n
            budget = 12 * n + runtime  # Megatron: 2 + 4 + 12 / dp bytes per parameter, dp = 2
            rows.append([label, str(r["rank"]), f"{n / 1e6:.1f}M", f"{runtime / 2**30:.2f}", f"{peak / 2**30:.2f}",
                         f"{above:.2f}", f"{budget / 2**30:.2f}", f"{peak / budget:.3f}"])
    print(f"llama {args.layers} layers, bf16, distributed optimizer, dp 2 (gloo), seq 128, micro batch 1, "
          "2 micro-batches per rank, 2 steps")
    print_markdown_table(["engine", "rank", "params", "runtime GiB", "peak GiB", "B/param above runtime",
                          "Megatron budget GiB (12 B/param + runtime)", "peak / budget"], rows)


if __name__ == "__main__":
    main()
