"""Benchmark: training throughput and peak memory of `mzoo train` against a plain transformers loop.

What it measures, in one run, on one randomly initialised Llama-style model (default: hidden 512,
4 layers, 8 heads, 4 query groups, ffn 1408, vocab 8000, untied, ~20 M parameters), fp32, random
tokens, sequence length 256, micro batch 2, global batch 8 (gradient accumulation), 8 optimizer steps:

  baseline  a plain transformers loop: LlamaForCausalLM(LlamaConfig(...)) (random init, sdpa
            attention), torch.optim.AdamW (lr 3e-4, wd 0.1), loss = model(input_ids, labels=...).loss
            / accumulation, backward per micro-batch, clip_grad_norm_(1.0) (mzoo clips at 1.0 by
            default, so both do the same work), optimizer.step; 1 process x 2 threads
  mzoo 1p   mzoo train model.yaml --mock-data --steps N --seq-len S --micro-batch 2 --global-batch 8
            --log-json FILE                                                   1 process x 2 threads
  mzoo TP2  the same with --tp 2                            (relaunches under torchrun) 2 x 1 thread
  mzoo PP2  the same with --pp 2                            (1F1B, 4 micro-batches)     2 x 1 thread
  mzoo DP2  the same with --dp 2                                        (info, plain)   2 x 1 thread
  mzoo DP2 + dist-opt  --dp 2 --distributed-optimizer                                   2 x 1 thread

Every row gets the same total thread budget, the machine's 2 cores: single-process rows run with
OMP_NUM_THREADS=2 (the baseline also calls torch.set_num_threads(2)), two-process rows with
OMP_NUM_THREADS=1 per process (what torchrun would set anyway; set explicitly here).

Throughput: both the baseline and mzoo time every optimizer step in-process with perf_counter
(zero_grad through optimizer.step and the loss .item(); data generation included) and write one
JSON line per step with `tokens_per_s` = global_batch x seq_len / step seconds (rank 0 for mzoo).
The first 2 steps are warm-up and are dropped; the table's tokens/s is the total tokens of the
remaining steps / the sum of their step times (i.e. the time-weighted mean, not the median; the
median of the per-step values is in --json). Start-up (imports, model init, process group) is not in
tokens/s; it is in the "wall s" column, the wall time of the whole subprocess.

Every row runs in its own subprocess. Peak RSS = max(ru_maxrss from os.wait4, polled summed RSS of
the whole process tree from /proc), so the multi-process rows include the `mzoo` parent that
relaunches itself, the torchrun agent and both workers (the "workers" column gives the polled peak
of the workers alone, i.e. the processes that train). GB = 1e9 bytes.

Other jobs on the machine skew the numbers: the 1-minute load average is printed before and after.

Run:  .venv/bin/python benchmarks/train.py
      [--steps N] [--hidden H] [--layers L] [--seq-len S] [--workdir DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proctree import machine_info, run_measured  # noqa: E402  (benchmarks/ is not a package)

GB = 1e9
WARMUP_STEPS = 2
MICRO_BATCH = 2
GLOBAL_BATCH = 8
THREAD_BUDGET = 2


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def model_dims(hidden: int, layers: int) -> dict:
    """Llama-style dimensions that follow hidden (512 -> 8 heads of 64, 4 query groups, ffn 1408)."""
    heads = max(2, hidden // 64)
    groups = max(2, heads // 2)
    while heads % groups or groups % 2:  # TP2 must divide the query groups, groups must divide heads
        groups -= 1
    ffn = max(128, round(hidden * 11 / 4 / 128) * 128)
    return {"hidden": hidden, "layers": layers, "heads": heads, "groups": groups, "ffn": ffn, "vocab": 8000,
            "max_pos": 4096, "eps": 1e-5, "theta": 10000.0}


def model_yaml(d: dict) -> str:
    return f"""\
name: bench-train-llama-{d['layers']}x{d['hidden']}
family: llama
source: mzoo benchmarks/train.py (random weights)
vocab_size: {d['vocab']}
hidden_size: {d['hidden']}
num_layers: {d['layers']}
num_attention_heads: {d['heads']}
num_query_groups: {d['groups']}
ffn_hidden_size: {d['ffn']}
activation: swiglu
normalization: rmsnorm
norm_eps: {d['eps']:.1e}
position_embedding: rope
rope:
  theta: {d['theta']}
max_position_embeddings: {d['max_pos']}
tie_embeddings: false
add_bias_linear: false
add_qkv_bias: false
"""


# The baseline, run as a script in its own subprocess: argv = dims JSON, steps, seq_len, log file.
BASELINE = r'''
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

d, steps, seq, log_path = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
micro, glob, threads = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
torch.set_num_threads(threads)
torch.manual_seed(1234)
cfg = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["ffn"],
                  num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                  num_key_value_heads=d["groups"], max_position_embeddings=d["max_pos"],
                  rms_norm_eps=d["eps"], rope_parameters={"rope_type": "default", "rope_theta": d["theta"]},
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
cfg._attn_implementation = "sdpa"
model = LlamaForCausalLM(cfg).float().train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
accum = glob // micro
gen = torch.Generator().manual_seed(1234)
with open(log_path, "w") as log:
    log.write(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                          "threads": torch.get_num_threads()}) + "\n")
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            ids = torch.randint(0, d["vocab"], (micro, seq), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(total)
        dt = time.perf_counter() - t0
        log.write(json.dumps({"step": step, "loss": loss_value, "grad_norm": float(norm),
                              "tokens_per_s": glob * seq / dt}) + "\n")
        log.flush()
'''


# ---------------------------------------------------------------------------------------------
# measurement (same method as benchmarks/convert.py)
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    step: str
    command: str
    processes: int
    threads: int
    log: str = ""
    wall_s: float = 0.0
    peak_rss: int = 0  # bytes: max(ru_maxrss of the subprocess, polled tree sum)
    ru_maxrss: int = 0
    polled_tree_rss: int = 0
    polled_workers_rss: int = 0
    max_procs: int = 0
    rc: int = 0
    error: str = ""
    steps_logged: int = 0
    measured_steps: int = 0
    measured_s: float = 0.0
    tokens_per_s: float | None = None  # total tokens / total time of the measured steps
    median_tokens_per_s: float | None = None
    vs_baseline: float | None = None
    final_loss: float | None = None
    extra: dict = field(default_factory=dict)


def measure(row: Row, argv: list[str], env: dict) -> Row:
    """Run argv in its own subprocess; wall time and the process tree's peak RSS."""
    time.sleep(0.5)
    run = run_measured(argv, env)
    row.wall_s, row.rc, row.ru_maxrss = run.wall_s, run.rc, run.ru_maxrss
    row.polled_tree_rss, row.polled_workers_rss = run.poller.peak_total, run.poller.peak_workers
    row.peak_rss = run.peak_rss
    row.max_procs = run.poller.max_procs
    if row.rc != 0:
        row.error = run.output[-3000:] or f"exit status {row.rc}"
    return row


def read_throughput(row: Row, tokens_per_step: int) -> None:
    """Steady-state tokens/s from the per-step JSON lines, skipping the warm-up steps."""
    try:
        lines = [json.loads(line) for line in Path(row.log).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        row.rc, row.error = row.rc or 1, f"cannot read the step log {row.log}: {e}"
        return
    for line in lines:
        if "params" in line:
            row.extra["params"] = line["params"]
            row.extra["torch_threads"] = line["threads"]
    steps = [line for line in lines if "step" in line]
    row.steps_logged = len(steps)
    measured = steps[WARMUP_STEPS:]
    if not measured:
        row.rc, row.error = row.rc or 1, f"only {len(steps)} steps logged; need more than {WARMUP_STEPS}"
        return
    seconds = [tokens_per_step / s["tokens_per_s"] for s in measured]
    row.measured_steps, row.measured_s = len(measured), sum(seconds)
    row.tokens_per_s = tokens_per_step * len(measured) / row.measured_s
    row.median_tokens_per_s = statistics.median(s["tokens_per_s"] for s in measured)
    row.final_loss = steps[-1]["loss"]
    row.extra["step_s"] = [round(tokens_per_step / s["tokens_per_s"], 3) for s in steps]


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def print_table(rows: list[Row], info: dict) -> None:
    headers = ["step", "processes", "threads/proc", "tokens/s", "vs baseline", "peak RSS GB",
               "workers GB", "wall s", "final loss"]
    body = []
    for r in rows:
        if r.rc != 0 or r.tokens_per_s is None:
            body.append([r.step, str(r.processes), str(r.threads), "FAILED", f"rc={r.rc}", "", "", "", ""])
            continue
        body.append([
            r.step, str(r.processes), str(r.threads), f"{r.tokens_per_s:,.0f}",
            "" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x",
            f"{r.peak_rss / GB:.2f}", f"{r.polled_workers_rss / GB:.2f}", f"{r.wall_s:.1f}",
            "" if r.final_loss is None else f"{r.final_loss:.3f}",
        ])
    d = info["dims"]
    print(f"train benchmark: llama {d['layers']}x{d['hidden']}, {d['heads']} heads / {d['groups']} query groups, "
          f"ffn {d['ffn']}, vocab {d['vocab']}, untied, fp32 ({info['params_h']} params); seq {info['seq_len']}, "
          f"micro batch {MICRO_BATCH}, global batch {GLOBAL_BATCH} ({info['tokens_per_step']:,} tokens/step), "
          f"{info['steps']} steps, first {WARMUP_STEPS} excluded")
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        print(line(b))
    print(f"tokens/s = total tokens / total time of steps {WARMUP_STEPS + 1}..{info['steps']} (in-process step "
          "timers; start-up excluded); vs baseline = tokens/s ratio (>1 is faster).")
    print("peak RSS = max(ru_maxrss from os.wait4, polled RSS summed over the process tree: for 2-process rows the "
          "mzoo parent + torchrun agent + 2 workers); workers GB = polled peak of the training process(es) only.")
    print("threads: 1-process rows OMP_NUM_THREADS=2 (+ torch.set_num_threads(2) in the baseline); 2-process rows "
          "OMP_NUM_THREADS=1 per process.")
    print(f"commands ($WORK = {info['workdir']}, holding model.yaml, baseline.py and the step logs):")
    for r in rows:
        print(f"  {r.step}: {r.command}")
    for r in rows:
        if r.rc != 0:
            print(f"\n{r.step} failed ({r.command}):\n{r.error}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help=f"optimizer steps per row (default 8; first "
                                                         f"{WARMUP_STEPS} excluded)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the model YAML and the step logs")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        ap.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    if args.layers < 2 or args.layers % 2:
        ap.error("--layers must be even and at least 2 (PP2 splits the layers)")
    if args.hidden < 256 or args.hidden % 128:
        ap.error("--hidden must be a multiple of 128, at least 256 (even head and group counts for TP2)")
    if args.seq_len < 8:
        ap.error("--seq-len must be at least 8")

    py = sys.executable
    mzoo = shutil.which("mzoo", path=str(Path(py).parent)) or shutil.which("mzoo")
    if mzoo is None:
        print("cannot find the mzoo command next to", py, file=sys.stderr)
        return 2
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    PYTHONUNBUFFERED="1")

    def env_for(threads: int) -> dict:
        return dict(base_env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="mzoo-train-bench-", dir=args.workdir))
    else:
        work = Path(tempfile.mkdtemp(prefix="mzoo-train-bench-"))
    log = sys.stderr
    try:
        dims = model_dims(args.hidden, args.layers)
        cfg = work / "model.yaml"
        cfg.write_text(model_yaml(dims))
        (work / "baseline.py").write_text(BASELINE)
        tokens_per_step = GLOBAL_BATCH * args.seq_len
        common = ["--mock-data", "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                  "--micro-batch", str(MICRO_BATCH), "--global-batch", str(GLOBAL_BATCH)]
        half = THREAD_BUDGET // 2
        plan = [
            ("baseline (transformers)", 1, THREAD_BUDGET,
             [py, str(work / "baseline.py"), json.dumps(dims, separators=(",", ":")), str(args.steps),
              str(args.seq_len), "{log}", str(MICRO_BATCH), str(GLOBAL_BATCH), str(THREAD_BUDGET)]),
            ("mzoo 1 process", 1, THREAD_BUDGET, [mzoo, "train", str(cfg), *common, "--log-json", "{log}"]),
            ("mzoo TP2", 2, half, [mzoo, "train", str(cfg), *common, "--tp", "2", "--log-json", "{log}"]),
            ("mzoo PP2", 2, half, [mzoo, "train", str(cfg), *common, "--pp", "2", "--log-json", "{log}"]),
            ("mzoo DP2", 2, half, [mzoo, "train", str(cfg), *common, "--dp", "2", "--log-json", "{log}"]),
            ("mzoo DP2 + dist-opt", 2, half,
             [mzoo, "train", str(cfg), *common, "--dp", "2", "--distributed-optimizer", "--log-json", "{log}"]),
        ]
        # untimed warm-up: the first torch import after a cold start reads the .so/.pyc files from disk
        print("[bench] warm-up ...", file=log, flush=True)
        subprocess.run([py, "-c", "import torch, transformers, mzoo.models"], env=env_for(1), capture_output=True, check=False)
        subprocess.run([mzoo, "--help"], env=env_for(1), capture_output=True, check=False)
        load_before = os.getloadavg()
        t_start = time.perf_counter()
        rows: list[Row] = []
        for i, (name, procs, threads, cmd) in enumerate(plan):
            step_log = work / f"steps-{i}.jsonl"
            cmd = [str(step_log) if c == "{log}" else c for c in cmd]
            shown = " ".join(c if not c.startswith("{") else f"'{c}'" for c in cmd).replace(str(work), "$WORK")
            row = Row(step=name, command=f"OMP_NUM_THREADS={threads} {shown}", processes=procs, threads=threads,
                      log=str(step_log))
            print(f"[bench] {name} ...", file=log, flush=True)
            measure(row, cmd, env_for(threads))
            if row.rc == 0:
                read_throughput(row, tokens_per_step)
            tps = f"{row.tokens_per_s:,.0f} tok/s" if row.tokens_per_s else "no throughput"
            print(f"[bench]   {tps}, wall {row.wall_s:.1f} s, peak RSS {row.peak_rss / GB:.2f} GB, rc {row.rc}",
                  file=log, flush=True)
            rows.append(row)
        total_s = time.perf_counter() - t_start

        base = rows[0]
        for r in rows:
            if base.tokens_per_s and r.tokens_per_s:
                r.vs_baseline = r.tokens_per_s / base.tokens_per_s
        from mzoo.zoo import resolve

        from mzoo.params import count_params

        params = count_params(resolve(str(cfg))).total
        info = {
            **machine_info(load_before[0]),
            "dims": dims,
            "params": params,
            "baseline_params": base.extra.get("params"),
            "params_h": f"{params / 1e6:.1f} M",
            "seq_len": args.seq_len,
            "steps": args.steps,
            "tokens_per_step": tokens_per_step,
            "total_s": round(total_s, 1),
            "workdir": str(work),
        }
        if args.json:
            print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
        else:
            print(f"{info['date']}  {info['machine']}  python {info['python']}  load avg (1 min) "
                  f"{info['loadavg_1m_before']} before / {info['loadavg_1m_after']} after; "
                  f"{info['total_s']:.0f} s in all")
            print(f"parameters: mzoo {params:,}; transformers baseline {info['baseline_params'] or 0:,}")
            print_table(rows, info)
        return 0 if all(r.rc == 0 for r in rows) else 1
    finally:
        if args.keep:
            print(f"[bench] kept {work}", file=log)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
