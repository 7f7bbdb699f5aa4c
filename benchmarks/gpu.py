#!/usr/bin/env python3
"""Validate mzoo's engine on ONE NVIDIA GPU within a time box (default 420 s; never over 8 minutes).

    .venv/bin/python benchmarks/gpu.py --out "$OUT"                    # on the GPU machine, repo root
    .venv/bin/python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke    # CPU, tiny shapes, same code paths

Each check appends one JSON line to OUT/results.jsonl as it ends (a killed run keeps what it
learned); the run ends with a Markdown table on stdout and in OUT/summary.md (then each check's full
JSON). The numbers go to docs/benchmarks.md. Checks run in priority order, are skipped when the
budget left is below their estimate, and record their own exceptions (traceback tail) so the others
still run; a watchdog writes the summary and exits 40 s after the budget.

  C0 env          torch / CUDA / NCCL / cuDNN versions, GPU, SDPA and TF32 flags, bf16 GEMM TFLOP/s
  C1 parity       4-layer llama (head_dim 128, GQA, vocab 32003: padded) vs transformers, loaded through
                  the converter adapter: logits, loss (mzoo's vocab-parallel CE vs torch CE on HF's
                  logits), every gradient under its HF name. fp32 (TF32 off) must agree to round-off;
                  in bf16 each side is measured against fp32 HF, mzoo passing at <= 2x HF's error
  C2 throughput   llama3.2-1b through the real Trainer (bf16, seq 8192, micro batch 1, 4 micro-batches):
                  tokens/s, the trainer's MFU, peak memory vs the planner's estimate; then recompute=full
  C3 profile      one step under torch.profiler: GPU time in GEMM / attention / elementwise / memcpy
                  kernels, GPU idle fraction, top 15 kernels
  C4 accumulation bf16 model, 8 and 64 micro-batches: the optimizer's fp32 p.main_grad vs the fp32 sum
                  of each micro-batch's gradient (caught on its way in: bit-identical expected)
  C5 moe          one mixtral-8x7b layer, 4096 tokens: fwd+bwd time (grouped GEMM where the device
                  and dtype allow it, then the per-expert loop), host synchronisations per forward /
                  backward and the source lines making them
  C6 compile      (if time is left) torch.compile on each decoder layer: step speed-up over C2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

try:
    import mzoo.models  # noqa: F401  (installed in editable mode: pip install -e .)
except ImportError:  # a bare checkout: pyproject.toml's package-dir mapping, rebuilt with symlinks
    for _name in [m for m in sys.modules if m == "mzoo" or m.startswith("mzoo.")]:
        del sys.modules[_name]
    _repo, _pkg = Path(__file__).resolve().parent.parent, Path(tempfile.mkdtemp(prefix="mzoo-pkg-")) / "mzoo"
    _pkg.mkdir()
    for _entry in (_repo / "mzoo").iterdir():
        (_pkg / _entry.name).symlink_to(_entry)
    for _folder in ("models", "converters", "cli", "zoo"):
        (_pkg / _folder).symlink_to(_repo / _folder)
    sys.path.insert(0, str(_pkg.parent))
from mzoo.converters.adapter import for_family
from mzoo.models.canonical import load_canonical
from mzoo.models import build_chunks, build_model
from mzoo.parallel.optimizer import AdamWConfig, Optimizer
from mzoo.parallel.sharding import to_global
from mzoo.parallel.state import ParallelState
from mzoo.plan.costs import model_flops_per_token
from mzoo.layout import Layout
from mzoo.plan.memory import memory
from mzoo.plan.profile import engine_profile
from mzoo.plan.settings import Settings
from mzoo.data.gpt import MockGPTDataset
from mzoo.train.trainer import TrainConfig, Trainer, detect_peak_tflops
from mzoo.zoo import resolve

T0 = time.time()
HARD_CAP_S = 465.0  # from the end of the imports: with them the run stays under 8 minutes
ARGS = argparse.Namespace(budget=420.0, out="gpu-check-out", smoke=True)
RESULTS: list[dict] = []
CACHE: dict[str, Any] = {}  # the llama3.2-1b trainer shared by C2, C3 and C6; the running check
LOCK = threading.RLock()
BF16 = torch.bfloat16


# ---- plumbing -----------------------------------------------------------------------------------
def left() -> float:
    return ARGS.budget - (time.time() - T0)


def record(name: str, **data: Any) -> dict:
    row = {"check": name, "t": round(time.time() - T0, 1), **data}
    with LOCK:
        RESULTS.append(row)
        with open(Path(ARGS.out) / "results.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "trace"}, default=str)[:1500], flush=True)
    return row


def check(name: str, cost: float) -> Callable:
    """Run the check if `cost` seconds (its GPU estimate) are left; a failure is a result, not a stop."""
    def wrap(fn: Callable[[], dict]) -> Callable[[], dict]:
        def run() -> dict:
            if left() < cost:
                return record(name, status="skipped", key=f"{left():.0f}s left < {cost:.0f}s estimate")
            CACHE["running"], start = name, time.time()
            try:
                out = fn() or {}
                return record(name, status=out.pop("status", "ok"), seconds=round(time.time() - start, 1), **out)
            except Exception as e:  # noqa: BLE001 - a failed check is a result
                return record(name, status="error", seconds=round(time.time() - start, 1),
                              key=f"{type(e).__name__}: {e}"[:300], trace=traceback.format_exc()[-2500:])
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        run.__name__ = fn.__name__
        return run
    return wrap


def cuda() -> bool:
    return not ARGS.smoke


def dev() -> torch.device:
    return torch.device("cuda", 0) if cuda() else torch.device("cpu")


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn(), synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gib(x: float) -> float:
    return round(x / 2**30, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against the reference b."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def state():
    return ParallelState.single(device=dev())


def off_device(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers not on the engine's device (each is a copy per forward, or a bug)."""
    items = list(model.named_parameters()) + list(model.named_buffers())
    return sorted({re.sub(r"\.\d+\.", ".N.", n) for n, t in items if t.device.type != dev().type})


def commit() -> Optional[str]:
    """mzoo's commit read from .git without running git (the device copy may have no .git)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        return ((git / head[5:]).read_text() if head.startswith("ref: ") else head).strip()[:12]
    except OSError:
        return None


# ---- C0 -----------------------------------------------------------------------------------------
@check("C0_env", 15)
def c0_env() -> dict:
    import transformers
    be = torch.backends
    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda_build": torch.version.cuda, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "mzoo_commit": commit(), "smoke": ARGS.smoke,
        "sdpa": {"flash": be.cuda.flash_sdp_enabled(), "mem_efficient": be.cuda.mem_efficient_sdp_enabled(),
                 "cudnn": getattr(be.cuda, "cudnn_sdp_enabled", lambda: None)(), "math": be.cuda.math_sdp_enabled()},
        "tf32": {"matmul": be.cuda.matmul.allow_tf32, "cudnn": be.cudnn.allow_tf32,
                 "float32_matmul_precision": torch.get_float32_matmul_precision()}}
    name = "cpu (smoke)"
    if not ARGS.smoke:
        if not torch.cuda.is_available():
            return {**info, "status": "fatal", "key": f"torch {torch.__version__} sees no CUDA device"}
        p = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        name = p.name
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=gib(p.total_memory),
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
                    cudnn=be.cudnn.version(), peak_bf16_tflops=detect_peak_tflops())
    n = 512 if ARGS.smoke else 8192
    a, b = (torch.randn(n, n, device=dev(), dtype=BF16) for _ in range(2))
    s = timed(lambda: a @ b, repeats=3 if ARGS.smoke else 10, warmup=1 if ARGS.smoke else 3)
    tflops, peak = 2 * n**3 / s / 1e12, info.get("peak_bf16_tflops")
    info["bf16_gemm"] = {"n": n, "tflops": round(tflops, 3), "of_peak": round(tflops / peak, 3) if peak else None}
    info["key"] = (f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {info.get('nccl')}; "
                   f"bf16 GEMM {n}^3 {tflops:.1f} TFLOP/s" + (f" ({tflops / peak:.0%} of {peak:.0f})" if peak else ""))
    return info


# ---- C1: parity vs transformers -------------------------------------------------------------------
def hf_reference(cfg) -> torch.nn.Module:
    """An HF Llama in fp32 with random weights; norm weights moved off 1 so their grads are tested."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hf = {k: v for k, v in for_family(cfg.family).config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(LlamaConfig(**hf), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return ref.to(dev()).train()


def mzoo_from(cfg, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """mzoo's model built on the device in `dtype`, filled from HF tensors through the adapter."""
    adapter, model = for_family(cfg.family), build_model(cfg, state(), device=dev(), dtype=dtype)
    with torch.no_grad():
        load_canonical(model, lambda name: adapter.to_canonical(name, sd.__getitem__, cfg, exists=sd.__contains__))
    return model.train()


def run_pair(cfg, ref: torch.nn.Module, ours: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Logits, loss and gradients of both models on the same tokens; grads keyed by HF name."""
    adapter, (inp, tgt) = for_family(cfg.family), (ids[:, :-1], ids[:, 1:])
    ref.zero_grad(set_to_none=True)
    hl = ref(input_ids=inp).logits
    hloss = F.cross_entropy(hl.float().reshape(-1, hl.shape[-1]), tgt.reshape(-1))
    hloss.backward()
    with torch.no_grad():
        ol = ours(inp)
    oloss = ours(inp, labels=tgt).float().mean()  # the training path: vocab-parallel CE, per token
    oloss.backward()
    hf_params, grads = dict(ref.named_parameters()), {}
    for name, p in ours.canonical_parameters():
        for hf_name, g in adapter.to_hf(name, to_global(p, p.grad, None, 1, cfg.vocab_size), cfg):
            grads[hf_name] = (g.detach().float(), hf_params[hf_name].grad.detach().float())
    return {"hf": (hl.detach().float(), hloss.item(), 1), "mzoo": (ol.float(), oloss.item(), 0), "grads": grads,
            "hf_tensors": len(hf_params)}


def errors(run: dict, ref: dict, side: str) -> dict:
    """One side's logits, loss and gradients against the HF fp32 run `ref`."""
    logits, loss, which = run[side]
    g = {k: rel(pair[which], ref["grads"][k][1]) for k, pair in run["grads"].items()}
    return {"logit_max_abs_err": (logits - ref["hf"][0]).abs().max().item(), "logit_rel_err": rel(logits, ref["hf"][0]),
            "loss_err": abs(loss - ref["hf"][1]), "worst_grad_rel_err": max(g.values()),
            "median_grad_rel_err": statistics.median(g.values()), "worst_grad": max(g, key=g.get)}


@check("C1_parity_vs_transformers", 60)
def c1_parity() -> dict:
    shape = (dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                  head_dim=64, vocab_size=1003) if ARGS.smoke else
             dict(num_layers=4, hidden_size=1024, ffn_hidden_size=3584, num_attention_heads=8, num_query_groups=2,
                  head_dim=128, vocab_size=32003))
    cfg = resolve("llama3-8b").replace(max_position_embeddings=8192, **shape)
    ref = hf_reference(cfg)
    sd = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
    seq, be = (64 if ARGS.smoke else 2048), torch.backends
    ids = torch.randint(0, cfg.vocab_size, (2, seq + 1), generator=torch.Generator().manual_seed(1)).to(dev())
    tf32 = be.cuda.matmul.allow_tf32, be.cudnn.allow_tf32
    be.cuda.matmul.allow_tf32 = be.cudnn.allow_tf32 = False
    try:
        r32 = run_pair(cfg, ref, mzoo_from(cfg, sd, torch.float32), ids)
    finally:
        be.cuda.matmul.allow_tf32, be.cudnn.allow_tf32 = tf32
    fp32 = {**errors(r32, r32, "mzoo"), "grads_compared": len(r32["grads"]), "hf_tensors": r32["hf_tensors"]}
    for p in ref.parameters():  # HF's bf16 path casts parameters only (rotary inv_freq stays fp32)
        p.data = p.data.to(BF16)
    r16 = run_pair(cfg, ref, mzoo_from(cfg, sd, BF16), ids)
    mz, hf = errors(r16, r32, "mzoo"), errors(r16, r32, "hf")
    tol = 1e-4 if ARGS.smoke else 1e-3
    ok32 = (max(fp32["logit_max_abs_err"], fp32["loss_err"], fp32["worst_grad_rel_err"]) < tol
            and fp32["grads_compared"] == fp32["hf_tensors"])
    ok16 = (mz["logit_rel_err"] <= 2 * hf["logit_rel_err"] and mz["worst_grad_rel_err"] <= 2 * hf["worst_grad_rel_err"]
            and mz["loss_err"] <= max(2 * hf["loss_err"], 1e-3))
    key = (f"fp32 logits {fp32['logit_max_abs_err']:.1e}, loss {fp32['loss_err']:.1e}, grads <= "
           f"{fp32['worst_grad_rel_err']:.1e} ({fp32['grads_compared']}/{fp32['hf_tensors']}); bf16 err mzoo/HF: "
           f"logits {mz['logit_rel_err'] / hf['logit_rel_err']:.2f}x, worst grad "
           f"{mz['worst_grad_rel_err'] / hf['worst_grad_rel_err']:.2f}x, loss {mz['loss_err']:.1e} vs "
           f"{hf['loss_err']:.1e}")
    return {"status": "pass" if ok32 and ok16 else "FAIL", "key": key, "seq": seq, "batch": 2,
            "fp32_tf32_off_mzoo_vs_hf": fp32, "bf16_vs_fp32_hf": {"mzoo": mz, "hf": hf}, "fp32_pass": ok32,
            "bf16_pass": ok16}


# ---- C2 / C3 / C6: llama3.2-1b through the Trainer ------------------------------------------------
MICRO, NMICRO = 1, 4


def llama() -> dict:
    """The llama3.2-1b trainer (tiny in smoke), built and initialised on the device once."""
    if "llama" in CACHE:
        return CACHE["llama"]
    cfg, seq = resolve("llama3.2-1b"), 8192
    if ARGS.smoke:
        cfg, seq = cfg.replace(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                               num_query_groups=2, head_dim=32, vocab_size=1024), 128
    st, t = state(), time.perf_counter()
    model = build_chunks(cfg, st, dtype=BF16)
    model.init_weights(seed=1)  # drawn on the CPU, copied to the device
    sync()
    init_s = time.perf_counter() - t
    tcfg = TrainConfig(seq_len=seq, micro_batch=MICRO, global_batch=MICRO * NMICRO, steps=10**6, lr=1e-4,
                       warmup=1, precision="bf16")
    trainer = Trainer(model, cfg, st, tcfg, MockGPTDataset(cfg.vocab_size, seq, seed=1))
    CACHE["llama"] = {"cfg": cfg, "model": model, "trainer": trainer, "tcfg": tcfg, "init_s": round(init_s, 1)}
    return CACHE["llama"]


def measure(trainer, warm: int, n: int) -> dict:
    """Synchronised seconds per step over n steps after `warm`, the trainer's own numbers, peak memory."""
    for _ in range(warm):
        trainer.train_step()
    sync()
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    logs = [trainer.train_step() for _ in range(n)]
    sync()
    step_s = (time.perf_counter() - t) / n
    med = lambda xs: statistics.median(list(xs))  # noqa: E731
    row = {"step_s": round(step_s, 4), "tokens_per_s": round(trainer.tcfg.global_batch * trainer.tcfg.seq_len / step_s),
           "trainer_tokens_per_s": round(med(x.tokens_per_s for x in logs)),
           "trainer_tflops": round(med(x.tflops_per_device for x in logs), 2),
           "trainer_mfu": None if logs[0].mfu is None else round(med(x.mfu for x in logs), 4),
           "loss": [round(x.loss, 4) for x in logs]}
    if cuda():
        free_b, total_b = torch.cuda.mem_get_info()
        outside = (total_b - free_b) - torch.cuda.memory_reserved()  # CUDA context, cuBLAS, NCCL
        row.update(peak_allocated_gib=gib(torch.cuda.max_memory_allocated()),
                   peak_reserved_gib=gib(torch.cuda.max_memory_reserved()),
                   peak_device_gib=gib(torch.cuda.max_memory_reserved() + outside))
    return row


def with_estimate(row: dict, cfg, tcfg) -> str:
    """Add the planner's engine estimate: allocated vs the estimate less its fixed runtime overhead
    (CUDA context, cuBLAS, NCCL: the allocator never sees it), device use vs all of it. Returns a summary."""
    settings = Settings(tcfg.seq_len, tcfg.global_batch, tcfg.micro_batch, tcfg.recompute,
                        distributed_optimizer=False)
    mem = memory(cfg, Layout(), settings, engine_profile("bf16", device=dev().type))
    row["estimate"] = {"total_gib": gib(mem.total), **{k: gib(v) for k, v in mem.parts().items() if v}}
    text = f"{row['tokens_per_s'] / 1e3:.1f}k tok/s, est {mem.total / 2**30:.2f} GiB"
    if "peak_allocated_gib" in row:
        ratio = row["allocated_over_estimate_ex_overhead"] = round(
            row["peak_allocated_gib"] * 2**30 / (mem.total - mem.overhead), 3)
        row["device_over_estimate"] = round(row["peak_device_gib"] * 2**30 / mem.total, 3)
        text = (f"{row['tokens_per_s'] / 1e3:.1f}k tok/s, MFU {row['trainer_mfu']}, peak "
                f"{row['peak_allocated_gib']:.1f} GiB (x{ratio:.2f} the estimate)")
    return text


@check("C2_throughput_llama3.2-1b", 150)
def c2_throughput() -> dict:
    c = llama()
    trainer, model, tcfg = c["trainer"], c["model"], c["tcfg"]
    out: dict[str, Any] = {"seq": tcfg.seq_len, "micro_batch": MICRO, "micro_batches": NMICRO,
                           "build_init_s": c["init_s"], "off_device": off_device(model)}
    keys = []
    for mode, warm, n in (("none", 2, 4), ("full", 1, 2)):
        if mode == "full" and left() < 40:
            out[mode] = "skipped: budget"
            continue
        model.set_recompute(mode)
        tcfg.recompute = mode
        out[mode] = row = measure(trainer, 1 if ARGS.smoke else warm, 2 if ARGS.smoke else n)
        keys.append(f"{mode}: {with_estimate(row, c['cfg'], tcfg)}")
        if mode == "none":
            CACHE["eager_step_s"] = row["step_s"]
    model.set_recompute("none")
    tcfg.recompute = "none"
    out["key"] = "; ".join(keys)
    return out


# ---- C3: profile --------------------------------------------------------------------------------
KINDS = (("attention", re.compile(r"flash|fmha|attention|sdpa|mem_eff", re.I)),  # before gemm: "cutlass" fmha
         ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|matmul|splitk|aten::(mm|addmm|bmm)$", re.I)),
         ("memcpy", re.compile(r"memcpy|memset|aten::copy_$", re.I)))


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "elementwise/other")


def spans_of(prof) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every GPU kernel; in smoke, of the CPU aten ops (self time)."""
    if cuda():
        return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == DeviceType.CUDA]
    return [(e.name, e.time_range.start, e.time_range.start + e.self_cpu_time_total) for e in prof.events()
            if e.name.startswith("aten::") and e.self_cpu_time_total > 0]


def breakdown(spans: list[tuple[str, float, float]], wall_us: float) -> dict:
    """Time share per kernel kind, busy time (union of spans), idle fractions, the top 15 kernels."""
    totals = {k: 0.0 for k in ("gemm", "attention", "elementwise/other", "memcpy")}
    per: dict[str, list[float]] = {}
    busy, end = 0.0, float("-inf")
    for name, a, b in sorted(spans, key=lambda s: s[1]):
        totals[kind_of(name)] += b - a
        agg = per.setdefault(name[:100], [0.0, 0])
        agg[0], agg[1] = agg[0] + b - a, agg[1] + 1
        if b > end:
            busy, end = busy + b - max(a, end), b
    total = sum(totals.values()) or 1.0
    span = (max(s[2] for s in spans) - min(s[1] for s in spans)) if spans else 1.0
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:15]
    return {"share": {k: round(v / total, 3) for k, v in totals.items()}, "busy_ms": round(busy / 1e3, 1),
            "idle_fraction_of_wall": round(1 - busy / wall_us, 3),
            "idle_fraction_of_kernel_span": round(1 - busy / span, 3),
            "top15": [{"kernel": k, "ms": round(v[0] / 1e3, 2), "calls": v[1], "kind": kind_of(k)} for k, v in top]}


@check("C3_profile_one_step", 45)
def c3_profile() -> dict:
    c = llama()
    c["trainer"].train_step()  # warm (cheap if C2 ran)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        c["trainer"].train_step()
        sync()
    wall_us = (time.perf_counter() - t) * 1e6
    spans = spans_of(prof)
    out = {"status": "ok" if spans else "no kernel events", "wall_ms": round(wall_us / 1e3, 1), "events": len(spans),
           "source": "cuda kernels" if cuda() else "cpu aten ops (smoke)", **breakdown(spans, wall_us)}
    sh = out["share"]
    out["key"] = (f"gemm {sh['gemm']:.0%}, attention {sh['attention']:.0%}, elementwise/other "
                  f"{sh['elementwise/other']:.0%}, memcpy {sh['memcpy']:.0%}; idle "
                  f"{out['idle_fraction_of_kernel_span']:.0%} of the kernel span, "
                  f"{out['idle_fraction_of_wall']:.0%} of {out['wall_ms']:.0f} ms")
    return out


# ---- C4: bf16 gradient accumulation -----------------------------------------------------------------
@check("C4_bf16_grad_accumulation", 40)
def c4_accum() -> dict:
    cfg = resolve("llama-tiny") if ARGS.smoke else resolve("llama3.2-1b").replace(num_layers=2, vocab_size=32000)
    seq, st = (64 if ARGS.smoke else 1024), state()
    model = build_chunks(cfg, st, dtype=BF16)
    model.init_weights(seed=3)
    opt = Optimizer(model, st, AdamWConfig())  # binds the fp32 main-grad hooks
    chunk, params, ds = model[0].train(), opt.params, MockGPTDataset(cfg.vocab_size, seq, seed=5)
    out: dict[str, Any] = {"seq": seq, "params": sum(p.numel() for p in params)}
    sums: dict[str, list[torch.Tensor]] = {}

    def loss(i: int, n: int) -> torch.Tensor:
        s = ds[i]
        return chunk(s["tokens"][None].to(dev()), labels=s["labels"][None].to(dev())).float().mean() / n

    def capture(i: int, g: torch.Tensor) -> None:  # a leaf's tensor hook runs before AccumulateGrad
        sums["fp32"][i].add_(g)
        sums["bf16"][i].add_(g)

    # The reference is each micro-batch's gradient caught on its way into the engine's hook, in the
    # same backward pass: GPU non-determinism between passes cannot blur the comparison.
    handles = [p.register_hook(lambda g, i=i: capture(i, g)) for i, p in enumerate(params)]
    try:
        for n in (8, 64):
            opt.zero_grad()
            sums["fp32"] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            sums["bf16"] = [torch.zeros_like(p) for p in params]  # what a bf16 .grad accumulator would hold
            for i in range(n):  # the engine: its post-accumulate hooks add each grad into p.main_grad
                loss(i, n).backward()
            ref = sums["fp32"]
            out[f"n{n}"] = {
                "main_grad_max_rel_err": max(rel(p.main_grad, r) for p, r in zip(params, ref)),
                "main_grad_max_abs_err": max((p.main_grad - r).abs().max().item() for p, r in zip(params, ref)),
                "bf16_accumulator_max_rel_err": max(rel(b, r) for b, r in zip(sums["bf16"], ref)),
                "params_with_leftover_grad": sum(p.grad is not None for p in params)}
    finally:
        for h in handles:
            h.remove()
    worst = max(out[f"n{n}"]["main_grad_max_rel_err"] for n in (8, 64))
    stray = max(out[f"n{n}"]["params_with_leftover_grad"] for n in (8, 64))
    out["status"] = "pass" if stray == 0 and worst == 0.0 else "FAIL"  # same fp32 adds in the same order
    n8, n64 = out["n8"], out["n64"]
    out["key"] = (f"main_grad rel err n8 {n8['main_grad_max_rel_err']:.1e}, n64 {n64['main_grad_max_rel_err']:.1e} "
                  f"(a bf16 accumulator: {n8['bf16_accumulator_max_rel_err']:.1e} / "
                  f"{n64['bf16_accumulator_max_rel_err']:.1e})")
    return out


# ---- C5: MoE layer --------------------------------------------------------------------------------
def host_syncs(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """Synchronising CUDA calls made by fn() (torch's sync debug mode) and the source lines making them."""
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in hits)
    return len(hits), [f"{k} x{v}" for k, v in sorted(where.items())]


@check("C5_moe_layer", 60)
def c5_moe() -> dict:
    cfg = resolve("mixtral-tiny" if ARGS.smoke else "mixtral-8x7b").replace(num_layers=1)
    seq = 256 if ARGS.smoke else 4096
    model = build_chunks(cfg, state(), dtype=BF16)
    with torch.no_grad():  # on-device random weights, for timing only (1.7 B CPU draws would take ~20 s)
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    chunk = model[0].train()
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(2)).to(dev())

    def fwd() -> torch.Tensor:
        return chunk(ids[:, :-1], labels=ids[:, 1:]).float().mean()

    def step() -> None:
        chunk.zero_grad(set_to_none=True)
        fwd().backward()

    experts = chunk.decoder.layers[0].mlp.experts
    s, flops = timed(step, repeats=3, warmup=1), model_flops_per_token(cfg, seq) * seq
    out: dict[str, Any] = {"tokens": seq, "experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
                           "off_device": off_device(model), "grouped_gemm": experts.uses_grouped_gemm(
                               torch.zeros(1, cfg.hidden_size, dtype=BF16, device=dev())),
                           "fwd_bwd_ms": round(s * 1e3, 2), "tflops": round(flops / s / 1e12, 3)}
    if cuda():
        held: list[torch.Tensor] = []
        out["syncs_forward"], out["sync_sites_forward"] = host_syncs(lambda: held.append(fwd()))
        out["syncs_backward"], out["sync_sites_backward"] = host_syncs(lambda: held.pop().backward())
    experts.grouped_gemm = False  # the per-expert loop, the reference
    try:
        out["loop_fwd_bwd_ms"] = round(timed(step, repeats=3, warmup=1) * 1e3, 2)
    finally:
        experts.grouped_gemm = True
    syncs = (f", {out['syncs_forward']} host syncs/fwd, {out['syncs_backward']}/bwd" if cuda()
             else ", syncs n/a on CPU")
    path = "grouped GEMM" if out["grouped_gemm"] else "loop"
    out["key"] = (f"fwd+bwd {out['fwd_bwd_ms']:.1f} ms ({path}, {out['tflops']:.1f} TFLOP/s), per-expert loop "
                  f"{out['loop_fwd_bwd_ms']} ms{syncs}")
    return out


# ---- C6: torch.compile per layer --------------------------------------------------------------------
@check("C6_compile_layers", 150)
def c6_compile() -> dict:
    c = llama()
    trainer, model = c["trainer"], c["model"]
    model.set_recompute("none")
    base = CACHE.get("eager_step_s") or measure(trainer, 1, 2)["step_s"]
    counters = torch._dynamo.utils.counters
    counters.clear()
    backend = "eager" if ARGS.smoke else "inductor"  # smoke: dynamo's tracing only (no C++/Triton builds)
    for chunk in model:
        for layer in chunk.decoder.layers:
            layer.compile(backend=backend)
    t = time.perf_counter()
    trainer.train_step()
    sync()
    first = time.perf_counter() - t
    row = measure(trainer, 1, 2 if ARGS.smoke else 3)
    breaks = dict(counters["graph_break"])
    out = {"backend": backend, "eager_step_s": base, "compiled_step_s": row["step_s"],
           "speedup": round(base / row["step_s"], 3), "first_compiled_step_s": round(first, 1),
           "graph_breaks": sum(breaks.values()),
           "graph_break_reasons": {k[:200]: v for k, v in list(breaks.items())[:8]},
           "unique_graphs": counters["stats"].get("unique_graphs"), "compiled": row}
    out["key"] = (f"{backend}: {base:.3f} -> {row['step_s']:.3f} s/step = {out['speedup']:.2f}x (first step "
                  f"{first:.0f} s, {out['graph_breaks']} graph breaks)")
    return out


CHECKS = [c0_env, c1_parity, c2_throughput, c3_profile, c4_accum, c5_moe, c6_compile]


# ---- summary ----------------------------------------------------------------------------------------
def table() -> str:
    lines = ["| check | result | key numbers | s |", "| --- | --- | --- | --- |"]
    for r in RESULTS:
        key = str(r.get("key", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['check']} | {r.get('status')} | {key} | {r.get('seconds', '')} |")
    return "\n".join(lines)


def finish() -> None:
    """Write summary.md and print the table, once (from the main thread or the watchdog)."""
    with LOCK:
        if CACHE.get("finished"):
            return
        CACHE["finished"] = True
        head = (f"# mzoo GPU check ({'smoke, CPU' if ARGS.smoke else dev()})\n\nbudget {ARGS.budget:.0f} s, "
                f"used {time.time() - T0:.0f} s; `{' '.join(sys.argv)}`\n")
        body = [f"## {r['check']}: {r.get('status')}\n\n```json\n"
                f"{json.dumps({k: v for k, v in r.items() if k != 'check'}, indent=1, default=str)[:6000]}\n```"
                for r in RESULTS]
        (Path(ARGS.out) / "summary.md").write_text("\n".join([head, table(), "", *body]) + "\n")
        print("\n" + table(), flush=True)


def watchdog() -> None:
    """Hard stop at min(budget + 40 s, HARD_CAP_S): record what was cut short, write the summary, exit."""
    deadline = min(ARGS.budget + 40.0, HARD_CAP_S)

    def fire() -> None:
        record("watchdog", status="killed", key=f"stopped at {time.time() - T0:.0f}s during {CACHE.get('running')}")
        finish()
        os._exit(3)

    timer = threading.Timer(max(1.0, deadline - (time.time() - T0)), fire)
    timer.daemon = True
    timer.start()


def main(argv: Optional[list[str]] = None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="for results.jsonl and summary.md")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds (at most 425: the run never passes 8 min)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code paths, for testing")
    ap.add_argument("--only", default="", help="comma-separated check prefixes, e.g. C0,C1")
    ARGS = ap.parse_args(argv)
    ARGS.budget = min(ARGS.budget, HARD_CAP_S - 40.0)  # the watchdog fires 40 s after it
    Path(ARGS.out).mkdir(parents=True, exist_ok=True)
    (Path(ARGS.out) / "results.jsonl").write_text("")
    if ARGS.smoke:
        torch.set_num_threads(1)
    watchdog()
    only = [s.strip().upper() for s in ARGS.only.split(",") if s.strip()]
    for fn in CHECKS:
        if only and not any(fn.__name__.upper().startswith(o) for o in only):
            continue
        if fn().get("status") == "fatal":
            break
    CACHE.pop("llama", None)
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
