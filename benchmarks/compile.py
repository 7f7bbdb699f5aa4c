"""Benchmark: `mzoo train --compile` (each decoder layer torch.compile'd, inductor on the CPU) against
the same run without it, the named baseline, measured in the same invocation.

The model: a small random llama (default hidden 256, 4 layers, 4 heads / 2 query groups, SwiGLU ffn
768, vocab 8000, untied, ~7 M parameters: benchmarks/train.py's llama at half its width, so
that a cold compile and the steps fit minutes on a shared 2-core machine), fp32, random tokens
(--mock-data), sequence length 128, micro batch 2, global batch 8 (4 micro-batches), 8 optimizer
steps. Two rows, each its own process with --threads intra-op threads (default 1):

  eager     mzoo train MODEL.yaml --mock-data --steps 8 --seq-len 128 --log-json FILE      (baseline)
  compile   the same with --compile

tokens/s: from the per-step JSON lines (`tokens_per_s` = global batch x seq len / step seconds, the
trainer's own perf_counter around the whole step); the first 2 steps are warm-up and dropped (step 1
of the compiled run holds the compilation), tokens/s = tokens of the remaining steps / their time.
"vs eager" is the ratio within one round. tok/CPU-s: the same tokens over the CPU seconds (user +
system) the process tree spent on them, read each time the step log gains a line: steadier than
wall time on a shared machine (a time slice taken away is not counted). compile s = the compiled run's step-1 time minus its
median measured step (the forward and backward graphs are compiled during step 1; evaluation would
compile once more, the benchmark runs none). Every row runs with a fresh, empty inductor cache
(TORCHINDUCTOR_CACHE_DIR under the work folder), so compile s is a cold compile.

Peak RSS = max(ru_maxrss from os.wait4, the polled RSS of the process tree) (benchmarks/proctree.py);
GB = 1e9 bytes. Rows run --repeats times (default 2) round-robin, eager first in odd rounds and
second in even ones (so neither always meets the machine's load first); the table shows medians,
"vs eager" the median of the per-round ratios.

Run:  .venv/bin/python benchmarks/compile.py [--hidden 256] [--layers 4] [--seq-len 128] [--steps 8]
                                             [--repeats 2] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))
from proctree import machine_info, print_markdown_table, run_measured  # noqa: E402  (benchmarks/ is not a package)

GB = 1e9
WARMUP_STEPS = 2
MICRO_BATCH, GLOBAL_BATCH = 2, 8
ROWS = (("eager", []), ("compile", ["--compile"]))


def llama(hidden: int, layers: int) -> dict:
    """benchmarks/train.py's llama: 64-wide heads, half as many query groups, ffn ~ 11/4 hidden."""
    heads = max(2, hidden // 64)
    ffn = max(128, round(hidden * 11 / 4 / 128) * 128)
    return {"name": f"bench-compile-llama-{layers}x{hidden}", "source": "mzoo benchmarks/compile.py (random weights)",
            "family": "llama", "vocab_size": 8000, "hidden_size": hidden, "num_layers": layers,
            "num_attention_heads": heads, "num_query_groups": max(1, heads // 2), "ffn_hidden_size": ffn,
            "activation": "swiglu", "normalization": "rmsnorm", "norm_eps": 1e-5, "position_embedding": "rope",
            "rope": {"theta": 10000.0}, "max_position_embeddings": 4096, "tie_embeddings": False,
            "add_bias_linear": False, "add_qkv_bias": False}


def measure(argv: list[str], env: dict, log: Path, tokens_per_step: int) -> dict:
    """One row: tokens/s after warm-up, compile seconds, peak RSS and wall time."""
    if log.exists():
        log.unlink()
    res = run_measured(argv, env, watch=log)
    if res.rc != 0:
        return {"error": res.output[-3000:] or f"exit status {res.rc}"}
    steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    seconds = [tokens_per_step / s["tokens_per_s"] for s in steps]
    measured = seconds[WARMUP_STEPS:]
    if not measured:
        return {"error": f"only {len(steps)} steps logged; need more than {WARMUP_STEPS}"}
    cpu = res.poller.cpu_at_line  # the tree's CPU seconds when the log had n lines
    first, last = WARMUP_STEPS, len(steps)
    cpu_s = cpu[last] - cpu[first] if first in cpu and last in cpu and cpu[last] > cpu[first] else None
    return {"tokens_per_s": tokens_per_step * len(measured) / sum(measured),
            "tokens_per_cpu_s": tokens_per_step * len(measured) / cpu_s if cpu_s else None,
            "compile_s": seconds[0] - statistics.median(measured), "step_s": [round(s, 3) for s in seconds],
            "peak_rss": res.peak_rss, "wall_s": res.wall_s, "final_loss": steps[-1]["loss"]}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="also print every run as JSON")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        ap.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    mzoo = shutil.which("mzoo", path=str(Path(sys.executable).parent)) or shutil.which("mzoo")
    if mzoo is None:
        print("cannot find the mzoo command next to", sys.executable, file=sys.stderr)
        return 2
    import yaml

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="mzoo-compile-bench-"))
    try:
        (work / "model.yaml").write_text(yaml.safe_dump(llama(args.hidden, args.layers), sort_keys=False))
        tokens_per_step = GLOBAL_BATCH * args.seq_len
        base = [mzoo, "train", str(work / "model.yaml"), "--mock-data", "--steps", str(args.steps), "--seq-len",
                str(args.seq_len), "--micro-batch", str(MICRO_BATCH), "--global-batch", str(GLOBAL_BATCH)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
        runs: dict[str, list[dict]] = {name: [] for name, _ in ROWS}
        for r in range(args.repeats):
            for name, flags in (ROWS if r % 2 == 0 else ROWS[::-1]):  # alternate: neither row always first
                cache = work / f"inductor-{name}-{r}"  # cold compile every time
                log = work / f"steps-{name}-{r}.jsonl"
                got = measure([*base, *flags, "--log-json", str(log)], dict(env, TORCHINDUCTOR_CACHE_DIR=str(cache)),
                              log, tokens_per_step)
                print(f"round {r + 1} {name}: {got.get('error') or got['step_s']}", file=sys.stderr)
                runs[name].append(got)
        info = machine_info(load_before)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [f"{name}: {run['error']}" for name, rs in runs.items() for run in rs if "error" in run]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    print(f"{info['date']}, {info['machine']}, torch {info.get('torch')}, mzoo {info.get('mzoo_commit')}, "
          f"{args.threads} thread(s), load {info['loadavg_1m_before']} -> {info['loadavg_1m_after']}")
    print(f"llama {args.layers} x {args.hidden}, fp32, seq {args.seq_len}, global batch {GLOBAL_BATCH} "
          f"(micro {MICRO_BATCH}), {args.steps} steps, {WARMUP_STEPS} warm-up, median of {args.repeats}\n")
    body = []
    for name, _ in ROWS:
        rs = runs[name]
        ratio = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rs, runs["eager"]))
        cpu = [(a["tokens_per_cpu_s"], b["tokens_per_cpu_s"]) for a, b in zip(rs, runs["eager"])
               if a["tokens_per_cpu_s"] and b["tokens_per_cpu_s"]]
        body.append(["eager (baseline)" if name == "eager" else "--compile",
                     f"{statistics.median(r['tokens_per_s'] for r in rs):,.0f}", f"{ratio:.2f}",
                     f"{statistics.median(a for a, _ in cpu):,.0f}" if cpu else "-",
                     f"{statistics.median(a / b for a, b in cpu):.2f}" if cpu else "-",
                     f"{statistics.median(r['compile_s'] for r in rs):.1f}" if name == "compile" else "-",
                     f"{statistics.median(r['peak_rss'] for r in rs) / GB:.2f}",
                     f"{statistics.median(r['wall_s'] for r in rs):.1f}",
                     f"{statistics.median(r['final_loss'] for r in rs):.4f}"])
    print_markdown_table(["row", "tokens/s", "vs eager", "tok/CPU-s", "vs eager CPU", "compile s", "peak RSS GB", "wall s", "final loss"], body)
    if args.json:
        print(json.dumps({"info": info, "args": vars(args), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
