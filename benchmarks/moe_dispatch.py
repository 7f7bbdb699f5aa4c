"""MoE dispatch (issue 18): one Mixtral-shaped MoE layer, fwd+bwd time and peak RSS, before vs now.

The layer: hidden 512, 8 experts of FFN 1792 (Mixtral's 3.5x), SwiGLU, top-2 softmax routing,
4096 tokens ([4096, 1, 512] activations), random weights; one process on the CPU. Rows:

- `before`: the dispatch this issue replaced, copied verbatim below (`before_dispatch_and_combine`:
  argsort, an index_select of the token copies, the experts, the weights gathered and multiplied,
  an index_add combine; 3 .tolist() syncs with EP) and the per-expert loop. The named baseline.
- `sort-gather + loop`: today's dispatch (one gather in, one gather out, weighted sum over k, no
  index_add in forward or backward) with the per-expert loop (`experts.grouped_gemm = False`).
- `sort-gather + grouped GEMM`: today's default, `torch._grouped_mm` for fc1 and fc2.
- `... weights copied`: the same with the zero-copy weight stack turned off (`torch.stack` per step,
  kept for the backward): what the grouped path costs when the expert weights are separate tensors.

Every row builds the layer, hands it to mzoo's Optimizer (its parameters become views of one
buffer and gradients accumulate into fp32 main grads, as in training), runs 2 warm-up steps and
`--steps` timed fwd+bwd steps in its own subprocess; time is the median step. Peak RSS is the
child's ru_maxrss; "steps' peak" is its VmHWM at the end above its RSS before the first step (the
layer, its fp32 main grads and the inputs built): what the steps' activations, gradients and
temporaries cost at their peak, allocator caching included.
The list of rows runs `--repeats` times round-robin; the table shows medians, the spread
((max - min) / median) and the ratio to `before` (median of per-round ratios).

    .venv/bin/python benchmarks/moe_dispatch.py [--dtype fp32,bf16] [--tokens 4096] [--steps 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROWS = ("before", "sort-gather + loop", "sort-gather + grouped GEMM", "sort-gather + grouped GEMM, weights copied")


def before_dispatch_and_combine(tokens, weights, indices, num_experts, state, run):
    """mzoo/parallel/experts.py `_dispatch_and_combine` before issue 18 (commit 676f570), verbatim
    but for the experts' call signature (which now also takes the counts as a device tensor)."""
    import torch

    from mzoo.parallel import collectives as C

    def call(x, sizes):
        return run(x, sizes, torch.tensor(sizes, device=x.device))

    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    source = order // k  # the token each sorted copy came from
    counts = torch.bincount(flat, minlength=num_experts)
    routed = tokens.index_select(0, source)
    ep, group = state.config.ep, state.ep_group
    if ep > 1 and group is not None:
        local = num_experts // ep
        send = counts.view(ep, local).sum(1).tolist()
        received = C.exchange_counts(counts, group).view(ep, local)  # [source rank, local expert]
        recv_sizes = received.sum(1).tolist()
        arrived = C.all_to_all(routed, recv_sizes, send, group)  # grouped by source rank, then expert
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=received.device).repeat(ep),
                                               received.reshape(-1))
        regroup = torch.argsort(expert_of_row, stable=True)
        out = call(arrived.index_select(0, regroup), received.sum(0).tolist())
        out = C.all_to_all(out.index_select(0, torch.argsort(regroup)), send, recv_sizes, group)
    else:
        out = call(routed, counts.tolist())
    out = out * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype)
    return tokens.new_zeros(tokens.shape).index_add(0, source, out)


def _hwm_kb() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process in kB."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    return values["VmHWM"], values["VmRSS"]


def child(row: str, dtype_name: str, tokens: int, steps: int, threads: int) -> dict:
    import torch

    from mzoo.models.moe import MoELayer
    from mzoo.parallel import experts as E
    from mzoo.parallel.optimizer import AdamWConfig, Optimizer
    from mzoo.parallel.state import ParallelState
    from mzoo.zoo import resolve

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg = resolve("mixtral-tiny").replace(hidden_size=512, num_attention_heads=8, num_query_groups=8,
                                          **{"moe.num_experts": 8, "moe.top_k": 2, "moe.ffn_hidden_size": 1792})
    layer = MoELayer(cfg, ParallelState.single(), dtype=dtype).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    Optimizer(layer, ParallelState.single(), AdamWConfig())
    if row == "before":
        E._dispatch_and_combine = before_dispatch_and_combine
    layer.experts.grouped_gemm = "grouped" in row
    if row.endswith("weights copied"):
        E._strided_view = lambda weights: None
    x = (torch.randn(tokens, 1, cfg.hidden_size, generator=g)).to(dtype).requires_grad_()
    grad = torch.randn(tokens, 1, cfg.hidden_size, generator=g).to(dtype)

    def step() -> None:
        x.grad = None
        layer(x).backward(grad)

    _, built = _hwm_kb()
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    hwm, _ = _hwm_kb()
    return {"ms": statistics.median(times) * 1e3, "step_peak_mb": (hwm - built) / 1024,
            "grouped": layer.experts.uses_grouped_gemm(x)}


def measure(row: str, dtype: str, a: argparse.Namespace) -> dict:
    args = [sys.executable, __file__, "--child", row, "--dtype", dtype, "--tokens", str(a.tokens),
            "--steps", str(a.steps), "--threads", str(a.threads)]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    out, err = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"row {row!r} failed:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.dtype, a.tokens, a.steps, a.threads)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "mzoo", "models", "benchmarks"], capture_output=True,
                           text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, mzoo {commit}{' + uncommitted' if dirty else ''}, "
          f"load average {load:.2f} before; MoE layer hidden 512, 8 experts x FFN 1792, top-2, {a.tokens} tokens, "
          f"{a.threads} threads, median of {a.steps} steps, {a.repeats} rounds.\n")
    for dtype in a.dtype.split(","):
        rounds: list[dict[str, dict]] = []
        for _ in range(a.repeats):
            rounds.append({row: measure(row, dtype, a) for row in ROWS})
        print(f"{dtype}:\n")
        print("| dispatch + experts | fwd+bwd ms | spread | vs before | peak RSS MB | steps' peak MB | grouped GEMM ran |")
        print("|---|---|---|---|---|---|---|")
        for row in ROWS:
            ms = [r[row]["ms"] for r in rounds]
            med = statistics.median(ms)
            ratio = statistics.median(r[row]["ms"] / r["before"]["ms"] for r in rounds)
            rss = statistics.median(r[row]["peak_rss_mb"] for r in rounds)
            step = statistics.median(r[row]["step_peak_mb"] for r in rounds)
            print(f"| {row} | {med:.0f} | {(max(ms) - min(ms)) / med:.0%} | {ratio:.2f} | {rss:.0f} | {step:.0f} | "
                  f"{'yes' if rounds[0][row]['grouped'] else 'no'} |", flush=True)
        print()
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
