"""Benchmark: training throughput and peak memory of `mzoo train` against a plain transformers loop.

What it measures, in one run, on small randomly initialised models of five kinds (default hidden 512,
vocab 8000, untied unless said, fp32, random tokens, sequence length 256, micro batch 2, global batch 8
by gradient accumulation, 6 optimizer steps of which the first 2 are warm-up):

  llama     4 layers, 8 heads / 4 query groups, SwiGLU ffn 1408                       (~20.0 M params)
  mixtral   llama's attention, 8 experts top-2 of ffn 704 in every layer (active FFN = llama's),
            load-balancing loss 0.01                                           (~46 M total, ~20 M active)
  deepseek  DeepSeek-V3 style: MLA (q_lora 256, kv_lora 128, nope 64 + rope 32, v 64), 1 dense layer
            (ffn 1408) then MoE: 8 routed experts top-2 + 1 shared, ffn 448, sigmoid routing with
            expert bias, 2 groups / top-1 group, scaling 2.5                   (~32 M total, ~20 M active)
  mamba2    8 Mamba-2 layers (d_state 64, expand 2, head_dim 64, 2 groups, chunk 64), tied (~17.9 M)
  hybrid    8 layers, Megatron pattern M-M*M-M* (4 Mamba-2, 2 attention, 2 squared-ReLU MLP of
            ffn 1408), no positions                                                      (~19.8 M)

For every model, two or three rows, each one process with --threads intra-op threads (default 1; see Threads):

  baseline  a plain transformers loop on the same architecture: AutoModelForCausalLM.from_config of the
            Hugging Face config mzoo's own adapter writes for the model (LlamaForCausalLM,
            MixtralForCausalLM, DeepseekV3ForCausalLM, Mamba2ForCausalLM, NemotronHForCausalLM; its
            default attention (sdpa) and experts implementation (grouped_mm); Mamba layers run
            transformers' pure-torch path, as there are no CUDA kernels here), random init,
            torch.optim.AdamW (lr 3e-4, wd 0.1), loss = model(input_ids, labels=...).loss / accumulation
            (Mixtral: output_router_logits=True so the load-balancing loss is computed as in mzoo),
            backward per micro-batch, clip_grad_norm_(1.0) (mzoo clips at 1.0 by default), optimizer.step
  mzoo      mzoo train MODEL.yaml --mock-data --steps N --seq-len S --micro-batch 2 --global-batch 8
            --log-json FILE
  megatron-core  (llama, mixtral: what megatron-core builds on CPU without Transformer Engine or
            mamba-ssm; --no-megatron-core skips them) the real megatron-core GPTModel of the same
            config (tests/mcore_ref.py's builder: local spec, fp32, its unfused DotProductAttention,
            fusions off, SequentialMLP experts), one gloo process, Megatron's per-token loss averaged,
            torch.optim.AdamW (lr 3e-4, wd 0.1), clip_grad_norm_(1.0): a peer built the same way

and, for the overhead of the parallel layouts over gloo (the --parallel list, default
llama:tp2, llama:pp2, mixtral:ep2), one row per layout on 2 processes x 1 thread (`--tp 2`, `--pp 2`
(1F1B, 4 micro-batches), `--ep 2 --dp 2`, `--dp 2`, `--dp 2 --distributed-optimizer`) against mzoo on
1 process x 1 thread (the model's own mzoo row with --threads 1, else an extra `mzoo 1 x 1` row).
Their "vs ref" is tokens/s per process relative to that one-process run: 1.00 means the two processes
together are twice as fast as one, i.e. no parallel overhead.

Threads: the default gives every process one thread. On a machine shared with other jobs, a process
with 2 OpenMP threads waits at the end of every parallel region for its slower thread: with the
machine's load average at ~5 on 2 cores, mzoo's MoE models (many small ops) ran 13-15x slower with
2 threads than with 1, llama (a few large matmuls) did not; with the machine quiet, 2 threads were
1.2-1.6x faster than 1. One thread per process keeps the comparison about the work each
implementation does; --threads 2 gives the one-process rows both cores (fair on a quiet 2-core
machine; then the parallel rows get an extra `mzoo 1 x 1` reference row).

Throughput: both the baseline and mzoo time every optimizer step in-process with perf_counter
(zero_grad through optimizer.step and the loss .item(); data generation included) and write one
JSON line per step with `tokens_per_s` = global_batch x seq_len / step seconds (rank 0 for mzoo; it
is the whole job's rate). The first 2 steps are warm-up and are dropped; a run's tokens/s is the
total tokens of the remaining steps / the sum of their step times. Start-up (imports, model init,
process group) is not in tokens/s; it is in "wall s".

CPU: the /proc poller also reads the process tree's CPU seconds (user + system, all live processes of
the row, summed) each time the step log gains a line, so "tok/CPU-s" = tokens of the measured steps /
CPU seconds they used, and "vs ref CPU" compares it with the reference row like "vs ref". It moves
much less than wall time when other jobs share the cores (a time slice taken away is not counted),
so it is the steadier comparison on a busy machine; for the 2-process rows it is the parallel
overhead in work (communication, duplicated work, waiting that spins) whether or not the second core
was free. With 2 threads per process it also counts OpenMP spin-waiting.

Repeats (--repeats, default 2): the whole plan runs R times, round-robin, so a model's baseline and
mzoo rows are always adjacent in time. Every number in the table is the median over the R rounds;
"vs ref" is the median of the per-round ratios (a row / its reference in the same round), which
cancels most of the drift in machine load between rounds; "spread" is (max - min) / median of the
row's tokens/s over the rounds.

Peak RSS = max(ru_maxrss from os.wait4, polled summed RSS of the whole process tree from /proc), so
the multi-process rows include the `mzoo` parent that relaunches itself, the torchrun agent and both
workers ("workers GB" is the polled peak of the training processes alone). GB = 1e9 bytes.

Run:  .venv/bin/python benchmarks/train.py
      [--models llama,mixtral,deepseek,mamba2,hybrid] [--parallel llama:tp2,llama:pp2,mixtral:ep2]
      [--repeats R] [--steps N] [--hidden H] [--layers L] [--seq-len S] [--threads T]
      [--workdir DIR] [--keep] [--json]
      (--parallel none: no multi-process rows; layouts: tp2, pp2, ep2, dp2, dp2-distopt; --layers is the
      transformer layer count, the Mamba models get twice as many layers)
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
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))
from proctree import machine_info, print_markdown_table, run_measured  # noqa: E402  (benchmarks/ is not a package)

GB = 1e9
WARMUP_STEPS = 2
MICRO_BATCH = 2
GLOBAL_BATCH = 8
THREADS = 1
MODELS = ("llama", "mixtral", "deepseek", "mamba2", "hybrid")
LAYOUTS = {  # name -> (mzoo flags, processes)
    "tp2": (["--tp", "2"], 2),
    "pp2": (["--pp", "2"], 2),
    "ep2": (["--ep", "2", "--dp", "2"], 2),
    "dp2": (["--dp", "2"], 2),
    "dp2-distopt": (["--dp", "2", "--distributed-optimizer"], 2),
}
DEFAULT_PARALLEL = "llama:tp2,llama:pp2,mixtral:ep2"
MCORE_PEERS = ("llama", "mixtral")  # what megatron-core builds on CPU without Transformer Engine / mamba-ssm


# ---------------------------------------------------------------------------------------------
# models
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


def model_config(kind: str, d: dict) -> dict:
    """The mzoo ModelConfig (as a YAML mapping) of one benchmark model."""
    base = {"name": f"bench-train-{kind}-{d['layers']}x{d['hidden']}", "source": "mzoo benchmarks/train.py (random "
            "weights)", "vocab_size": d["vocab"], "hidden_size": d["hidden"], "normalization": "rmsnorm",
            "norm_eps": d["eps"], "max_position_embeddings": d["max_pos"], "tie_embeddings": False,
            "add_bias_linear": False, "add_qkv_bias": False}
    attn = {"num_attention_heads": d["heads"], "num_query_groups": d["groups"]}
    ssm = {"version": 2, "d_state": 64, "d_conv": 4, "expand": 2, "head_dim": 64, "num_groups": 2, "chunk_size": 64,
           "conv_bias": True, "proj_bias": False}
    ffn64 = lambda n: max(64, round(n / 64) * 64)  # noqa: E731
    if kind == "llama":
        return {**base, "family": "llama", "num_layers": d["layers"], **attn, "ffn_hidden_size": d["ffn"],
                "activation": "swiglu", "position_embedding": "rope", "rope": {"theta": d["theta"]}}
    if kind == "mixtral":  # top-2 of experts half llama's width: the same active FFN per token
        return {**base, "family": "mixtral", "num_layers": d["layers"], **attn, "ffn_hidden_size": d["ffn"] // 2,
                "activation": "swiglu", "position_embedding": "rope", "rope": {"theta": 1.0e6},
                "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": d["ffn"] // 2, "score_function": "softmax",
                        "norm_topk_prob": True, "aux_loss_coeff": 0.01}}
    if kind == "deepseek":  # top-2 + 1 shared expert of a third of llama's width
        return {**base, "family": "deepseek", "num_layers": d["layers"], "num_attention_heads": d["heads"],
                "ffn_hidden_size": d["ffn"], "activation": "swiglu", "position_embedding": "rope",
                "rope": {"theta": d["theta"]},
                "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": ffn64(d["ffn"] / 3), "num_shared_experts": 1,
                        "score_function": "sigmoid", "expert_bias": True, "n_group": 2, "topk_group": 1,
                        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "first_k_dense": 1, "layer_freq": 1},
                "mla": {"q_lora_rank": d["hidden"] // 2, "kv_lora_rank": d["hidden"] // 4, "qk_nope_head_dim": 64,
                        "qk_rope_head_dim": 32, "v_head_dim": 64}}
    if kind == "mamba2":
        return {**base, "family": "mamba", "num_layers": 2 * d["layers"], "num_attention_heads": 1,
                "ffn_hidden_size": 0, "activation": "silu", "position_embedding": "none", "tie_embeddings": True,
                "ssm": ssm}
    if kind == "hybrid":
        n = 2 * d["layers"]
        return {**base, "family": "mamba", "num_layers": n, **attn, "ffn_hidden_size": d["ffn"],
                "activation": "squared_relu", "position_embedding": "none",
                "ssm": {**ssm, "hybrid_pattern": ("M-M*" * n)[:n]}}
    raise ValueError(kind)


def describe(kind: str, cfg) -> str:
    """One line naming a model's shape for the table's header."""
    if kind == "llama":
        return f"{cfg.num_layers} layers, ffn {cfg.ffn_hidden_size}"
    if kind == "mixtral":
        m = cfg.moe
        return f"{cfg.num_layers} layers, {m.num_experts} experts top-{m.top_k} ffn {m.ffn_hidden_size}"
    if kind == "deepseek":
        m, a = cfg.moe, cfg.mla
        return (f"{cfg.num_layers} layers (1 dense), MLA q/kv lora {a.q_lora_rank}/{a.kv_lora_rank}, {m.num_experts} "
                f"experts top-{m.top_k} + {m.num_shared_experts} shared ffn {m.ffn_hidden_size}, sigmoid + bias")
    if kind == "mamba2":
        return f"{cfg.num_layers} Mamba-2 layers, d_state {cfg.ssm.d_state}, tied"
    return f"{cfg.num_layers} layers, pattern {cfg.ssm.hybrid_pattern}"


# The baseline, run as a script in its own subprocess:
# argv = HF config JSON file, steps, seq_len, log file, micro batch, global batch, threads.
BASELINE = r'''
import json, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM

hf = json.loads(open(sys.argv[1]).read())
steps, seq, log_path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
micro, glob, threads = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
torch.set_num_threads(threads)
torch.manual_seed(1234)
if hf.get("model_type") == "mixtral" and hf.get("router_aux_loss_coef"):
    hf["output_router_logits"] = True  # add the load-balancing loss, as mzoo does
cfg = AutoConfig.for_model(**hf)
model = AutoModelForCausalLM.from_config(cfg).float().train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
accum = glob // micro
vocab = cfg.vocab_size
gen = torch.Generator().manual_seed(1234)
with open(log_path, "w") as log:
    log.write(json.dumps({"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
                          "class": type(model).__name__, "attn": cfg._attn_implementation,
                          "experts": getattr(cfg, "_experts_implementation", None)}) + "\n")
    log.flush()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), generator=gen)
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


# The megatron-core peer, run as a script in its own subprocess: the real megatron-core GPTModel
# (tests/mcore_ref.py's builder: local spec, fp32, no fusions, CPU shim) on a one-process gloo group,
# forward/backward with Megatron's per-token loss, torch.optim.AdamW, clip 1.0.
# argv = mzoo model YAML, steps, seq_len, log file, micro batch, global batch, threads, tests dir.
MCORE = r'''
import json, os, socket, sys, time
sys.path.insert(0, sys.argv[8])
import torch
import torch.distributed as dist
from mcore_ref import build_gpt_model
from mzoo.zoo import resolve

cfg = resolve(sys.argv[1])
steps, seq, log_path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
micro, glob, threads = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
torch.set_num_threads(threads)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
model = build_gpt_model(cfg, tp=1, seed=1234).train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
accum, vocab = glob // micro, cfg.vocab_size
mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
positions = torch.arange(seq).unsqueeze(0).expand(micro, seq)
gen = torch.Generator().manual_seed(1234)
with open(log_path, "w") as log:
    log.write(json.dumps({"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
                          "class": type(model).__name__}) + "\n")
    log.flush()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, seq + 1), generator=gen)
            loss = model(ids[:, :-1], positions, mask, labels=ids[:, 1:]).mean() / accum
            loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        log.write(json.dumps({"step": step, "loss": float(total), "grad_norm": float(norm),
                              "tokens_per_s": glob * seq / dt}) + "\n")
        log.flush()
dist.destroy_process_group()
'''


# ---------------------------------------------------------------------------------------------
# measurement (same method as benchmarks/convert.py)
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One execution of one row."""

    wall_s: float = 0.0
    peak_rss: int = 0  # bytes: max(ru_maxrss of the subprocess, polled tree sum)
    ru_maxrss: int = 0
    polled_tree_rss: int = 0
    polled_workers_rss: int = 0
    max_procs: int = 0
    rc: int = 0
    error: str = ""
    steps_logged: int = 0
    measured_s: float = 0.0
    tokens_per_s: Optional[float] = None  # total tokens / total time of the measured steps
    median_step_tokens_per_s: Optional[float] = None
    cpu_s: Optional[float] = None  # tree CPU seconds over the measured steps
    tokens_per_cpu_s: Optional[float] = None
    final_loss: Optional[float] = None
    step_s: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class Row:
    step: str
    model: str
    command: str
    processes: int
    threads: int
    reference: Optional[str] = None  # the row this one's "vs ref" divides by
    per_process: bool = False  # vs ref compares tokens/s per process
    runs: list = field(default_factory=list)
    # medians over the runs
    tokens_per_s: Optional[float] = None
    tokens_per_cpu_s: Optional[float] = None
    peak_rss: int = 0
    polled_workers_rss: int = 0
    wall_s: float = 0.0
    final_loss: Optional[float] = None
    vs_ref: Optional[float] = None  # median over rounds of this row / its reference (per process if per_process)
    vs_ref_cpu: Optional[float] = None  # the same for tokens per CPU second
    spread: Optional[float] = None
    rc: int = 0
    error: str = ""

    @property
    def tokens_per_s_per_process(self) -> Optional[float]:
        return None if self.tokens_per_s is None else self.tokens_per_s / self.processes


def measure(argv: list[str], env: dict, log: Path, tokens_per_step: int) -> Run:
    """Run argv in its own subprocess: wall time, the tree's peak RSS, throughput from its step log."""
    time.sleep(0.5)
    if log.exists():
        log.unlink()
    run = Run()
    res = run_measured(argv, env, watch=log)
    run.wall_s, run.rc, run.ru_maxrss = res.wall_s, res.rc, res.ru_maxrss
    run.polled_tree_rss, run.polled_workers_rss = res.poller.peak_total, res.poller.peak_workers
    run.peak_rss, run.max_procs = res.peak_rss, res.poller.max_procs
    if run.rc != 0:
        run.error = res.output[-3000:] or f"exit status {run.rc}"
        return run
    read_throughput(run, log, tokens_per_step, res.poller.cpu_at_line)
    return run


def read_throughput(run: Run, log: Path, tokens_per_step: int, cpu_at_line: dict) -> None:
    """Steady-state tokens/s (and tokens per CPU second) from the per-step JSON lines, skipping the warm-up."""
    try:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        run.rc, run.error = run.rc or 1, f"cannot read the step log {log}: {e}"
        return
    step_line = {}  # step -> 1-based line number in the log
    for n, line in enumerate(lines, 1):
        if "params" in line:
            run.extra.update({k: line[k] for k in ("params", "threads", "class", "attn", "experts") if k in line})
        if "step" in line:
            step_line[line["step"]] = n
    steps = [line for line in lines if "step" in line]
    run.steps_logged = len(steps)
    measured = steps[WARMUP_STEPS:]
    if not measured:
        run.rc, run.error = run.rc or 1, f"only {len(steps)} steps logged; need more than {WARMUP_STEPS}"
        return
    seconds = [tokens_per_step / s["tokens_per_s"] for s in measured]
    run.measured_s = sum(seconds)
    run.tokens_per_s = tokens_per_step * len(measured) / run.measured_s
    run.median_step_tokens_per_s = statistics.median(s["tokens_per_s"] for s in measured)
    run.final_loss = steps[-1]["loss"]
    run.step_s = [round(tokens_per_step / s["tokens_per_s"], 3) for s in steps]
    first, last = step_line.get(WARMUP_STEPS), step_line.get(steps[-1]["step"])
    if first in cpu_at_line and last in cpu_at_line and cpu_at_line[last] > cpu_at_line[first]:
        run.cpu_s = cpu_at_line[last] - cpu_at_line[first]
        run.tokens_per_cpu_s = tokens_per_step * len(measured) / run.cpu_s


def summarise(rows: list[Row]) -> None:
    """Medians over the runs, and per-round ratios against each row's reference."""
    by = {r.step: r for r in rows}
    for r in rows:
        ok = [x for x in r.runs if x.rc == 0 and x.tokens_per_s]
        if len(ok) < len(r.runs):
            bad = next(x for x in r.runs if not (x.rc == 0 and x.tokens_per_s))
            r.rc, r.error = bad.rc or 1, bad.error
        if not ok:
            continue
        med = statistics.median
        tps = [x.tokens_per_s for x in ok]
        r.tokens_per_s = med(tps)
        r.spread = (max(tps) - min(tps)) / r.tokens_per_s if len(tps) > 1 else None
        cpu = [x.tokens_per_cpu_s for x in ok if x.tokens_per_cpu_s]
        r.tokens_per_cpu_s = med(cpu) if cpu else None
        r.peak_rss = int(med([x.peak_rss for x in ok]))
        r.polled_workers_rss = int(med([x.polled_workers_rss for x in ok]))
        r.wall_s = med([x.wall_s for x in ok])
        r.final_loss = med([x.final_loss for x in ok])
    for r in rows:
        ref = by.get(r.reference) if r.reference else None
        if ref is None:
            continue
        ratios, cpu_ratios = [], []
        for mine, theirs in zip(r.runs, ref.runs):  # same round
            if mine.tokens_per_s and theirs.tokens_per_s:
                scale = ref.processes / r.processes if r.per_process else 1.0
                ratios.append(mine.tokens_per_s / theirs.tokens_per_s * scale)
            if mine.tokens_per_cpu_s and theirs.tokens_per_cpu_s:
                cpu_ratios.append(mine.tokens_per_cpu_s / theirs.tokens_per_cpu_s)
        r.vs_ref = statistics.median(ratios) if ratios else None
        r.vs_ref_cpu = statistics.median(cpu_ratios) if cpu_ratios else None


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def print_table(rows: list[Row], info: dict) -> None:
    headers = ["row", "procs x threads", "tokens/s", "per proc", "spread", "vs ref", "reference", "tok/CPU-s",
               "vs ref CPU", "peak RSS GB", "workers GB", "wall s", "final loss"]
    body = []
    for r in rows:
        if r.tokens_per_s is None:
            body.append([r.step, f"{r.processes} x {r.threads}", "FAILED", f"rc={r.rc}", *[""] * 9])
            continue
        body.append([
            r.step, f"{r.processes} x {r.threads}", f"{r.tokens_per_s:,.0f}",
            f"{r.tokens_per_s_per_process:,.0f}",
            "" if r.spread is None else f"{r.spread:.0%}",
            "" if r.vs_ref is None else f"{r.vs_ref:.2f}x" + (" /proc" if r.per_process else ""),
            r.reference or "",
            "" if r.tokens_per_cpu_s is None else f"{r.tokens_per_cpu_s:,.0f}",
            "" if r.vs_ref_cpu is None else f"{r.vs_ref_cpu:.2f}x",
            f"{r.peak_rss / GB:.2f}", f"{r.polled_workers_rss / GB:.2f}", f"{r.wall_s:.1f}",
            "" if r.final_loss is None else f"{r.final_loss:.3f}",
        ])
    print(f"train benchmark: seq {info['seq_len']}, micro batch {info['micro_batch']}, global batch "
          f"{info['global_batch']} ({info['tokens_per_step']:,} tokens/step), fp32, {info['steps']} steps, first "
          f"{WARMUP_STEPS} excluded; {info['repeats']} round(s), medians")
    for kind, m in info["models"].items():
        base = m.get("baseline_params")
        print(f"  {kind:9s} {m['params'] / 1e6:.1f} M params ({m['active'] / 1e6:.1f} M active), {m['shape']}; "
              f"baseline {m.get('baseline_class') or '?'} {'' if base is None else f'{base / 1e6:.1f} M'}")
    print_markdown_table(headers, body, left=(0, 6))
    print(f"tokens/s = total tokens / total time of steps {WARMUP_STEPS + 1}..{info['steps']} (in-process step timers; "
          "start-up excluded), the whole job's rate; per proc = tokens/s / processes; spread = (max - min) / median "
          "over the rounds.")
    print("vs ref = median over rounds of (this row / its reference in the same round): tokens/s for the mzoo rows "
          "against the transformers baseline, tokens/s per process ('/proc') for the 2-process rows against mzoo on "
          "1 process x 1 thread (1.00x = no parallel overhead).")
    print("tok/CPU-s = tokens of the measured steps / CPU seconds the row's processes used meanwhile (all of them "
          "for 2-process rows); vs ref CPU = median over rounds of (tok/CPU-s / the reference's): for 2-process rows "
          "1.00x = the job spends no more CPU per token than one process (no parallel overhead in CPU terms).")
    print("peak RSS = max(ru_maxrss from os.wait4, polled RSS summed over the process tree: for 2-process rows the "
          "mzoo parent + torchrun agent + 2 workers); workers GB = polled peak of the training process(es) only.")
    print(f"commands ($WORK = {info['workdir']}, holding the model YAMLs, Hugging Face configs, baseline.py and the "
          "step logs):")
    for r in rows:
        print(f"  {r.step}: {r.command}")
    for r in rows:
        if r.rc != 0:
            print(f"\n{r.step} failed ({r.command}):\n{r.error}")


def parse_parallel(text: str, models: list[str]) -> list[tuple[str, str]]:
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for item in text.split(","):
        kind, _, layout = item.strip().partition(":")
        if kind not in MODELS or layout not in LAYOUTS:
            raise ValueError(f"--parallel entry '{item}' is not MODEL:LAYOUT with MODEL in {', '.join(MODELS)} and "
                             f"LAYOUT in {', '.join(LAYOUTS)}")
        if layout == "ep2" and kind not in ("mixtral", "deepseek"):
            raise ValueError(f"--parallel entry '{item}': ep2 needs an MoE model (mixtral, deepseek)")
        out.append((kind, layout))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"models compared with transformers (default {','.join(MODELS)}; 'none' for none)")
    ap.add_argument("--parallel", default=DEFAULT_PARALLEL,
                    help=f"MODEL:LAYOUT rows on 2 processes (default {DEFAULT_PARALLEL}; layouts "
                         f"{', '.join(LAYOUTS)}; 'none' for none)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the whole plan, medians reported (default 2)")
    ap.add_argument("--steps", type=int, default=6, help=f"optimizer steps per row (default 6; first "
                                                         f"{WARMUP_STEPS} excluded)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (default 4; Mamba models twice that)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256)")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"threads of the 1-process rows (default {THREADS}; 2-process rows always run 1 thread "
                         "per process)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the model YAMLs and the step logs")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-megatron-core", dest="megatron_core", action="store_false",
                    help="skip the megatron-core peer rows (llama, mixtral)")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        ap.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    if args.layers < 2 or args.layers % 2:
        ap.error("--layers must be even and at least 2 (PP2 splits the layers)")
    if args.hidden < 256 or args.hidden % 128:
        ap.error("--hidden must be a multiple of 128, at least 256 (even head and group counts for TP2)")
    if args.seq_len < 8 or args.seq_len % 64:
        ap.error("--seq-len must be a multiple of 64 (the Mamba-2 chunk)")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    models = [] if args.models.strip().lower() == "none" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        parallel = parse_parallel(args.parallel, models)
    except ValueError as e:
        ap.error(str(e))
    if not models and not parallel:
        ap.error("nothing to run: --models none and --parallel none")

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
        import yaml

        from mzoo.converters import for_family
        from mzoo.params import count_params
        from mzoo.zoo import resolve

        dims = model_dims(args.hidden, args.layers)
        (work / "baseline.py").write_text(BASELINE)
        (work / "mcore_peer.py").write_text(MCORE)
        tests_dir = str(Path(__file__).resolve().parent.parent / "tests")
        tokens_per_step = GLOBAL_BATCH * args.seq_len
        common = ["--mock-data", "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                  "--micro-batch", str(MICRO_BATCH), "--global-batch", str(GLOBAL_BATCH)]
        kinds = list(dict.fromkeys(models + [k for k, _ in parallel]))
        model_info: dict = {}
        for kind in kinds:
            (work / f"{kind}.yaml").write_text(yaml.safe_dump(model_config(kind, dims), sort_keys=False))
            cfg = resolve(str(work / f"{kind}.yaml"))
            counts = count_params(cfg)
            (work / f"{kind}.hf.json").write_text(json.dumps(for_family(cfg.family).config_to_hf(cfg)))
            model_info[kind] = {"params": counts.total, "active": counts.active, "shape": describe(kind, cfg)}

        # (row name, model, processes, threads, argv, reference row, per-process comparison)
        plan: list[tuple[str, str, int, int, list[str], Optional[str], bool]] = []
        t = args.threads
        for kind in models:
            plan.append((f"{kind}: transformers", kind, 1, t,
                         [py, str(work / "baseline.py"), str(work / f"{kind}.hf.json"), str(args.steps),
                          str(args.seq_len), "{log}", str(MICRO_BATCH), str(GLOBAL_BATCH), str(t)], None, False))
            plan.append((f"{kind}: mzoo", kind, 1, t,
                         [mzoo, "train", str(work / f"{kind}.yaml"), *common, "--log-json", "{log}"],
                         f"{kind}: transformers", False))
            if kind in MCORE_PEERS and args.megatron_core:
                plan.append((f"{kind}: megatron-core", kind, 1, t,
                             [py, str(work / "mcore_peer.py"), str(work / f"{kind}.yaml"), str(args.steps),
                              str(args.seq_len), "{log}", str(MICRO_BATCH), str(GLOBAL_BATCH), str(t), tests_dir],
                             f"{kind}: transformers", False))
        for kind in dict.fromkeys(k for k, _ in parallel):
            if t == 1 and kind in models:  # the model's own mzoo row already runs 1 process x 1 thread
                ref = f"{kind}: mzoo"
            else:
                ref = f"{kind}: mzoo 1 x 1"
                plan.append((ref, kind, 1, 1, [mzoo, "train", str(work / f"{kind}.yaml"), *common, "--log-json",
                                               "{log}"], None, False))
            for k, layout in parallel:
                if k != kind:
                    continue
                flags, procs = LAYOUTS[layout]
                plan.append((f"{kind}: mzoo {layout.upper()}", kind, procs, 1,
                             [mzoo, "train", str(work / f"{kind}.yaml"), *common, *flags, "--log-json", "{log}"],
                             ref, True))

        rows: list[Row] = []
        for i, (name, kind, procs, threads, cmd, ref, per_proc) in enumerate(plan):
            shown = " ".join(c if c != "{log}" else f"$WORK/steps-{i}.jsonl" for c in cmd).replace(str(work), "$WORK")
            rows.append(Row(step=name, model=kind, command=f"OMP_NUM_THREADS={threads} {shown}", processes=procs,
                            threads=threads, reference=ref, per_process=per_proc))

        # untimed warm-up: the first torch import after a cold start reads the .so/.pyc files from disk
        print("[bench] warm-up ...", file=log, flush=True)
        subprocess.run([py, "-c", "import torch, transformers, mzoo.models"], env=env_for(1), capture_output=True,
                       check=False)
        subprocess.run([mzoo, "--help"], env=env_for(1), capture_output=True, check=False)
        load_before = os.getloadavg()
        t_start = time.perf_counter()
        for rnd in range(args.repeats):
            for i, (name, kind, procs, threads, cmd, ref, per_proc) in enumerate(plan):
                step_log = work / f"steps-{i}.jsonl"
                argv_i = [str(step_log) if c == "{log}" else c for c in cmd]
                print(f"[bench] round {rnd + 1}/{args.repeats} {name} ...", file=log, flush=True)
                run = measure(argv_i, env_for(threads), step_log, tokens_per_step)
                tps = f"{run.tokens_per_s:,.0f} tok/s" if run.tokens_per_s else "no throughput"
                cpu = f", {run.tokens_per_cpu_s:,.0f} tok/CPU-s" if run.tokens_per_cpu_s else ""
                print(f"[bench]   {tps}{cpu}, wall {run.wall_s:.1f} s, peak RSS {run.peak_rss / GB:.2f} GB, "
                      f"rc {run.rc}, load {os.getloadavg()[0]:.1f}", file=log, flush=True)
                if run.rc != 0:
                    print(run.error[-1500:], file=log, flush=True)
                rows[i].runs.append(run)
        total_s = time.perf_counter() - t_start
        summarise(rows)
        for r in rows:
            if r.step.endswith(": transformers"):
                ok = [x for x in r.runs if x.extra.get("params")]
                if ok:
                    model_info[r.model]["baseline_params"] = ok[0].extra["params"]
                    model_info[r.model]["baseline_class"] = ok[0].extra.get("class")
                    model_info[r.model]["baseline_impl"] = {"attn": ok[0].extra.get("attn"),
                                                            "experts": ok[0].extra.get("experts")}

        info = {
            **machine_info(load_before[0]),
            "dims": dims,
            "models": model_info,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "repeats": args.repeats,
            "micro_batch": MICRO_BATCH,
            "global_batch": GLOBAL_BATCH,
            "tokens_per_step": tokens_per_step,
            "total_s": round(total_s, 1),
            "workdir": str(work),
        }
        if args.json:
            print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
        else:
            print(f"{info['date']}  {info['machine']}  python {info['python']}, torch {info['torch']}, "
                  f"transformers {info['transformers']}, mzoo {info['mzoo_commit']}; load avg (1 min) "
                  f"{info['loadavg_1m_before']} before / {info['loadavg_1m_after']} after; "
                  f"{info['total_s']:.0f} s in all")
            print_table(rows, info)
        return 0 if all(r.rc == 0 for r in rows) else 1
    finally:
        if args.keep:
            print(f"[bench] kept {work}", file=log)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
