"""Benchmark: checkpoint conversion speed and memory against a plain copy and the naive transformers path.

What it measures, in one run, on a randomly initialised llama-family model of ~1.3 GB (bf16) made on
the spot with `mzoo init` (no network, HF_HUB_OFFLINE=1), or on several sizes (--layers 12,32: ~1.3 and
~3.1 GB; the hidden size, and so the largest tensor, stays the same):

  interpreter   python -c "import torch, transformers, mzoo.converters"   (the baseline RSS of the budget)
  mzoo start-up mzoo --help                                                 (the CLI's own start-up; info)
  mzoo fixed    the hf->torch_dist command below on a 2-layer, 36 MB model  (what a conversion costs
                before and after its bytes: Python, torch import, config, atomic rename; for net/copy)
  plain copy    shutil.copytree of the Hugging Face folder                  (I/O floor; the time target)
  cp -r         the same with coreutils cp                                  (info: no interpreter start-up)
  copy + fsync  the same, then fsync every file       (info: mzoo fsyncs its output, the copy does not)
  naive         AutoModelForCausalLM.from_pretrained + save_pretrained      (what other tools do)
  hf->mcore     mzoo convert 'hf->megatron' SRC DST --tp 2 --pp 2 --quiet   (torch_dist)
  hf->legacy    same with --megatron-format torch                           (legacy torch)
  mcore->hf     mzoo convert 'megatron->hf' on the torch_dist output above

Every step runs in its own subprocess. Wall time is measured around that subprocess (start-up
included); peak RSS is the subprocess's own high-water mark, read with os.wait4 (ru_maxrss, which
also covers any descendants it waited for), cross-checked by polling /proc for the whole process tree
(summed RSS, and peak anonymous vs file-backed RSS, which shows whether a step holds tensors on the
heap or only touches mmapped files). Throughput is the model's safetensors bytes / wall time (GB =
1e9 bytes). `os.sync()` runs between steps (not timed) so one step's write-back does not land in
the next step's timing; the page cache is not dropped (that needs root), so sources are read warm.

Targets checked for each mzoo row:
  peak RSS  <  interpreter baseline RSS + 3 x largest tensor     (ratio column "RSS/budget" <= 1)
  time      <= 2 x plain-copy time                               (ratio column "time/copy"  <= 2)
and two more ratios that say where the time goes: "net/copy" = (wall - mzoo fixed) / plain copy, the
per-byte cost against the copy once the fixed ~2 s (mostly `import torch`) is set aside; and
"time/durable" = wall / (plain copy + fsync): mzoo fsyncs what it writes (as Megatron's DCP writer does),
the plain copy does not, so this is the like-for-like comparison.

Repeats (--repeats, default 2): the list of steps runs R times in a row (round-robin), so every step
and its baselines are measured close together in time; the table shows medians over the rounds
(time/copy is the median of the per-round ratios) and "spread" = (max - min) / median of the wall
times. Every output is deleted right after it is measured (its size recorded first; the torch_dist
output after the step that reads it), so the disk holds the model plus at most two outputs.

Sizes: with several --layers values, each model is made, measured and deleted in turn, one table per
size, then a table of peak RSS against model size: mzoo's stays bounded by the largest tensor, the
naive path's grows with the model. Before making a model the free disk space is checked
(shutil.disk_usage): a size that does not fit 3.5 x its bytes is scaled down (fewer layers), with a note.

Run:  .venv/bin/python benchmarks/convert.py
      [--workdir DIR] [--keep] [--layers N[,N...]] [--hidden H] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
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


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def model_yaml(layers: int, hidden: int) -> str:
    """A Llama-style config; heads/groups/ffn follow hidden (2048 -> 16 heads, 4 groups, ffn 5632)."""
    heads = hidden // 128 if hidden >= 256 else 2
    groups = max(2, heads // 4)
    while heads % groups or groups % 2:  # TP2 must divide the query groups, groups must divide heads
        groups -= 1
    ffn = max(128, round(hidden * 11 / 4 / 128) * 128)
    return f"""\
name: bench-llama-{layers}x{hidden}
family: llama
source: mzoo benchmarks/convert.py (random weights)
vocab_size: 32000
hidden_size: {hidden}
num_layers: {layers}
num_attention_heads: {heads}
num_query_groups: {groups}
ffn_hidden_size: {ffn}
activation: swiglu
normalization: rmsnorm
norm_eps: 1.0e-5
position_embedding: rope
rope:
  theta: 10000.0
max_position_embeddings: 4096
tie_embeddings: false
add_bias_linear: false
add_qkv_bias: false
"""


def safetensors_stats(folder: Path) -> tuple[int, int, str, int]:
    """(total tensor bytes, largest tensor bytes, its name, tensor count) from the files' headers."""
    total, largest, name, count = 0, 0, "", 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            total += end - start
            count += 1
            if end - start > largest:
                largest, name = end - start, key
    return total, largest, name, count


def dir_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    step: str
    command: str
    wall_s: float = 0.0
    peak_rss: int = 0  # bytes: max(ru_maxrss of the subprocess, polled tree sum)
    ru_maxrss: int = 0  # bytes, from os.wait4
    polled_tree_rss: int = 0
    peak_anon: int = 0
    peak_file: int = 0
    max_procs: int = 0
    out_bytes: int = 0
    rc: int = 0
    error: str = ""
    throughput_gbs: Optional[float] = None
    rss_budget_ratio: Optional[float] = None
    time_copy_ratio: Optional[float] = None
    spread: Optional[float] = None  # (max - min) / median of the wall times over the rounds
    runs: list = field(default_factory=list)  # the rounds' own Rows (medians above); empty inside a run
    extra: dict = field(default_factory=dict)


def measure(step: str, argv: list[str], env: dict, out: Optional[Path] = None) -> Row:
    """Run argv in its own subprocess; wall time and that subprocess's peak RSS."""
    os.sync()
    time.sleep(0.5)
    row = Row(step=step, command=" ".join(argv))
    run = run_measured(argv, env)
    row.wall_s, row.rc, row.ru_maxrss = run.wall_s, run.rc, run.ru_maxrss
    poller = run.poller
    row.polled_tree_rss = poller.peak_total
    row.peak_rss = run.peak_rss
    row.peak_anon, row.peak_file, row.max_procs = poller.peak_anon, poller.peak_file, poller.max_procs
    if out is not None:
        row.out_bytes = dir_bytes(out)
    if row.rc != 0:
        row.error = run.output[-2000:] or f"exit status {row.rc}"
    return row


def combine(step: str, command: str, runs: list[Row]) -> Row:
    """One row from the rounds of a step: medians of every measured quantity."""
    ok = [r for r in runs if r.rc == 0]
    row = Row(step=step, command=command, runs=runs)
    if len(ok) < len(runs):
        bad = next(r for r in runs if r.rc != 0)
        row.rc, row.error = bad.rc, bad.error
        return row
    med = statistics.median
    row.wall_s = med([r.wall_s for r in ok])
    for name in ("peak_rss", "ru_maxrss", "polled_tree_rss", "peak_anon", "peak_file", "out_bytes"):
        setattr(row, name, int(med([getattr(r, name) for r in ok])))
    row.max_procs = max(r.max_procs for r in ok)
    if len(ok) > 1 and row.wall_s > 0:
        row.spread = (max(r.wall_s for r in ok) - min(r.wall_s for r in ok)) / row.wall_s
    return row


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_gb(n: int) -> str:
    return f"{n / GB:.2f}"


def print_table(rows: list[Row], info: dict) -> None:
    headers = ["step", "wall s", "spread", "GB/s", "peak RSS GB", "anon / file GB", "out GB",
               "RSS/budget (<=1)", "time/copy (<=2)", "net/copy", "time/durable"]
    body = []
    for r in rows:
        if r.rc != 0:
            body.append([r.step, "skipped" if r.rc == -1 else "FAILED", "", "", "", "", "", "", f"rc={r.rc}", "", ""])
            continue

        def verdict(v: Optional[float], lim: float) -> str:
            return "" if v is None else f"{v:.2f} {'ok' if v <= lim else 'MISS'}"

        body.append([
            r.step,
            f"{r.wall_s:.2f}",
            "" if r.spread is None else f"{r.spread:.0%}",
            "" if r.throughput_gbs is None else f"{r.throughput_gbs:.2f}",
            fmt_gb(r.peak_rss),
            f"{fmt_gb(r.peak_anon)} / {fmt_gb(r.peak_file)}",
            fmt_gb(r.out_bytes) if r.out_bytes else "",
            verdict(r.rss_budget_ratio, 1.0),
            verdict(r.time_copy_ratio, 2.0),
            "" if "net_copy_ratio" not in r.extra else f"{r.extra['net_copy_ratio']:.2f}",
            "" if "durable_ratio" not in r.extra else f"{r.extra['durable_ratio']:.2f}",
        ])
    title = (f"convert benchmark: {info['model']} ({info['params_h']} params, {fmt_gb(info['model_bytes'])} GB "
             f"bf16, largest tensor {info['largest_tensor']} = {info['largest_tensor_bytes']:,} B); "
             f"RSS budget = {fmt_gb(info['interp_rss'])} + 3 x {fmt_gb(info['largest_tensor_bytes'])} "
             f"= {fmt_gb(info['rss_budget'])} GB; median of {info['repeats']} round(s)")
    print(title)
    print_markdown_table(headers, body)
    print("net/copy = (wall - mzoo fixed) / plain copy; time/durable = wall / (plain copy + fsync). "
          "spread = (max - min) / median of the wall times over the rounds; ratios = medians of per-round ratios.")
    print("peak RSS = max(ru_maxrss from os.wait4, polled sum over the process tree); anon / file = polled peaks "
          "of RssAnon and RssFile+RssShmem (file = mmapped/page-cache pages counted in RSS).")
    for r in rows:
        if r.rc != 0:
            print(f"\n{r.step} failed ({r.command}):\n{r.error}")


def print_scaling(results: list[tuple[list[Row], dict]]) -> None:
    """Peak RSS of every data-moving step against model size (two or more sizes)."""
    sizes = [info for _, info in results]
    steps = [r.step for r in results[0][0] if r.out_bytes or r.rc != 0]
    headers = ["step"] + [f"{fmt_gb(i['model_bytes'])} GB model" for i in sizes] + ["RSS growth GB",
                                                                                    "growth / model growth"]
    grow_model = sizes[-1]["model_bytes"] - sizes[0]["model_bytes"]
    body = []
    for step in steps:
        cells, vals = [step], []
        for rows, _ in results:
            r = next((x for x in rows if x.step == step), None)
            if r is None or r.rc != 0:
                cells.append("n/a")
                vals.append(None)
            else:
                cells.append(f"{fmt_gb(r.peak_rss)} ({fmt_gb(r.peak_anon)} anon)")
                vals.append(r.peak_rss)
        if vals[0] is not None and vals[-1] is not None:
            g = vals[-1] - vals[0]
            cells += [f"{g / GB:+.2f}", f"{g / grow_model:+.2f}" if grow_model else ""]
        else:
            cells += ["", ""]
        body.append(cells)
    largest = ", ".join(f"{i['largest_tensor_bytes'] / GB:.3f}" for i in sizes)
    print(f"peak RSS GB against model size (largest tensor {largest} GB in each; medians; 'anon' = heap)")
    print_markdown_table(headers, body)
    print("growth / model growth: 0 = RSS independent of the model's size, 1 = RSS grows byte for byte with it.")


# ---------------------------------------------------------------------------------------------
# one model size
# ---------------------------------------------------------------------------------------------
def model_params(layers: int, hidden: int, work: Path) -> int:
    from mzoo.params import count_params
    from mzoo.zoo import resolve

    probe = work / f"probe-{layers}x{hidden}.yaml"
    probe.write_text(model_yaml(layers, hidden))
    try:
        return count_params(resolve(str(probe))).total
    finally:
        probe.unlink()


def fit_layers(layers: int, hidden: int, work: Path, log) -> int:
    """The largest layer count <= layers whose model fits the free disk 3.5 times over (the model, the
    torch_dist output, one more output and slack)."""
    free = shutil.disk_usage(work).free
    n = layers
    while n > 2 and 3.5 * 2 * model_params(n, hidden, work) > free:
        n -= 2
    if n != layers:
        print(f"[bench] NOTE: {free / GB:.1f} GB free under {work}; {layers} layers x {hidden} "
              f"({2 * model_params(layers, hidden, work) / GB:.2f} GB bf16) needs ~3.5x that, so this run uses {n} "
              f"layers ({2 * model_params(n, hidden, work) / GB:.2f} GB).", file=log, flush=True)
        print(f"NOTE: scaled down from {layers} to {n} layers to fit {free / GB:.1f} GB of free disk.")
    if 3.5 * 2 * model_params(n, hidden, work) > free:
        raise SystemExit(f"not enough free disk under {work} ({free / GB:.1f} GB) even for {n} layers")
    return n


def _ratio(row: Row, base: Row) -> float:
    """Median over the rounds of row's wall time / base's wall time in the same round."""
    return statistics.median(a.wall_s / b.wall_s for a, b in zip(row.runs, base.runs) if a.rc == 0 and b.rc == 0)


def bench_size(layers: int, hidden: int, repeats: int, keep: bool, py: str, mzoo: str, env: dict, work: Path,
               log) -> tuple[list[Row], dict]:
    cfg = work / "model.yaml"
    cfg.write_text(model_yaml(layers, hidden))
    hf = work / "hf"
    print(f"[bench] writing llama {layers}x{hidden} to {hf} ...", file=log, flush=True)
    init = subprocess.run([mzoo, "init", str(cfg), str(hf), "--dtype", "bf16", "--seed", "0", "--json"],
                          env=env, capture_output=True, text=True)
    if init.returncode != 0:
        raise SystemExit(init.stdout + init.stderr)
    params = json.loads(init.stdout)["params"]
    model_bytes, largest, largest_name, n_tensors = safetensors_stats(hf)
    tiny = work / "tiny-hf"  # the fixed-cost probe: same family and command, 2 layers of 256
    (work / "tiny.yaml").write_text(model_yaml(2, 256))
    made = subprocess.run([mzoo, "init", str(work / "tiny.yaml"), str(tiny), "--dtype", "bf16"], env=env,
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(made.stdout + made.stderr)

    steps: list[tuple[str, list[str], Optional[Path]]] = [
        ("interpreter", [py, "-c", "import torch, transformers, mzoo.converters"], None),
        ("mzoo start-up (--help)", [mzoo, "--help"], None),
        ("mzoo fixed", [mzoo, "convert", "hf->megatron", str(tiny), str(work / "tiny-mcore"), "--tp", "2", "--pp", "2",
                        "--quiet"], work / "tiny-mcore"),
        ("plain copy", [py, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                        str(hf), str(work / "copy")], work / "copy"),
        ("cp -r", ["cp", "-r", str(hf), str(work / "cp")], work / "cp"),
        ("plain copy + fsync", [py, "-c",
                                "import os, shutil, sys\nshutil.copytree(sys.argv[1], sys.argv[2])\n"
                                "for d, _, fs in os.walk(sys.argv[2]):\n"
                                "    for f in fs:\n"
                                "        fd = os.open(os.path.join(d, f), os.O_RDONLY); os.fsync(fd); os.close(fd)",
                                str(hf), str(work / "copy_fsync")], work / "copy_fsync"),
        ("naive (transformers)", [py, "-c",
                                  "import sys\nfrom transformers import AutoModelForCausalLM\n"
                                  "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')\n"
                                  "m.save_pretrained(sys.argv[2])",
                                  str(hf), str(work / "naive")], work / "naive"),
        ("mzoo hf->torch_dist", [mzoo, "convert", "hf->megatron", str(hf), str(work / "mcore"),
                                 "--tp", "2", "--pp", "2", "--quiet"], work / "mcore"),
        ("mzoo hf->torch", [mzoo, "convert", "hf->megatron", str(hf), str(work / "legacy"),
                            "--tp", "2", "--pp", "2", "--megatron-format", "torch", "--quiet"],
         work / "legacy"),
        ("mzoo torch_dist->hf", [mzoo, "convert", "megatron->hf", str(work / "mcore"), str(work / "back"),
                                 "--quiet"], work / "back"),
    ]
    # untimed warm-up: the first torch import after a cold start reads ~1 GB of .so/.pyc files; every
    # measured step then starts from the same warm page cache
    print("[bench] warm-up ...", file=log, flush=True)
    subprocess.run(steps[0][1], env=env, capture_output=True)
    subprocess.run([mzoo, "--help"], env=env, capture_output=True)
    load_before = os.getloadavg()
    runs: dict[str, list[Row]] = {name: [] for name, _, _ in steps}
    for rnd in range(repeats):
        last = rnd == repeats - 1
        for name, cmd, out in steps:
            if name == "mzoo torch_dist->hf" and runs["mzoo hf->torch_dist"][-1].rc:
                runs[name].append(Row(step=name, command=" ".join(cmd), rc=-1,
                                      error="skipped: its source step failed"))
                continue
            print(f"[bench] round {rnd + 1}/{repeats} {name} ...", file=log, flush=True)
            r = measure(name, cmd, env, out)
            print(f"[bench]   {r.wall_s:.2f} s, peak RSS {fmt_gb(r.peak_rss)} GB, rc {r.rc}, load "
                  f"{os.getloadavg()[0]:.1f}", file=log, flush=True)
            runs[name].append(r)
            if not (keep and last):  # free the disk; the torch_dist output feeds the last step
                if out is not None and name != "mzoo hf->torch_dist":
                    shutil.rmtree(out, ignore_errors=True)
                if name == "mzoo torch_dist->hf":
                    shutil.rmtree(work / "mcore", ignore_errors=True)
    rows = [combine(name, " ".join(cmd), runs[name]) for name, cmd, _ in steps]

    by = {r.step: r for r in rows}
    interp, copy, fixed, durable = by["interpreter"], by["plain copy"], by["mzoo fixed"], by["plain copy + fsync"]
    budget = interp.peak_rss + 3 * largest
    for r in rows:
        if r.rc != 0 or r.out_bytes == 0 or r is fixed:  # interpreter / start-up rows move no data
            continue
        r.throughput_gbs = model_bytes / GB / r.wall_s
        if r.step.startswith("mzoo"):
            r.rss_budget_ratio = r.peak_rss / budget
            if copy.rc == 0:
                r.time_copy_ratio = _ratio(r, copy)
            if copy.rc == 0 and fixed.rc == 0:
                r.extra["net_copy_ratio"] = statistics.median(
                    (a.wall_s - f.wall_s) / c.wall_s for a, f, c in zip(r.runs, fixed.runs, copy.runs))
            if durable.rc == 0:
                r.extra["durable_ratio"] = _ratio(r, durable)

    info = {
        **machine_info(load_before[0]),
        "model": f"llama {layers}x{hidden}",
        "layers": layers,
        "hidden": hidden,
        "params": params,
        "params_h": f"{params / 1e9:.3f} B" if params >= 1e9 else f"{params / 1e6:.0f} M",
        "tensors": n_tensors,
        "model_bytes": model_bytes,
        "largest_tensor": largest_name,
        "largest_tensor_bytes": largest,
        "interp_rss": interp.peak_rss,
        "rss_budget": budget,
        "copy_wall_s": copy.wall_s,
        "repeats": repeats,
    }
    return rows, info


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the model(s) and the last round's outputs")
    ap.add_argument("--layers", default="12",
                    help="transformer layers, or a comma list of sizes (default 12 -> ~1.34 GB; 32 -> ~3.15 GB)")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every step, medians reported (default 2)")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in str(args.layers).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--layers must be an integer or a comma list of integers, not '{args.layers}'")
    if not sizes or min(sizes) < 2:
        ap.error("--layers must be at least 2 (the mzoo rows use PP2)")
    if args.hidden < 256 or args.hidden % 256:
        ap.error("--hidden must be a multiple of 256 (even head count for TP2)")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    py = sys.executable
    mzoo = shutil.which("mzoo", path=str(Path(py).parent)) or shutil.which("mzoo")
    if mzoo is None:
        print("cannot find the mzoo command next to", py, file=sys.stderr)
        return 2
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="mzoo-bench-", dir=args.workdir))
    else:
        root = Path(tempfile.mkdtemp(prefix="mzoo-bench-"))
    log = sys.stderr
    results: list[tuple[list[Row], dict]] = []
    try:
        for layers in sizes:
            work = root / f"L{layers}" if len(sizes) > 1 else root
            work.mkdir(exist_ok=True)
            n = fit_layers(layers, args.hidden, work, log)
            results.append(bench_size(n, args.hidden, args.repeats, args.keep, py, mzoo, env, work, log))
            if not args.keep and len(sizes) > 1:
                shutil.rmtree(work, ignore_errors=True)
        if args.json:
            out = [{"info": info, "rows": [asdict(r) for r in rows]} for rows, info in results]
            print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        else:
            for k, (rows, info) in enumerate(results):
                if k:
                    print()
                print(f"{info['date']}  {info['machine']}  python {info['python']}, torch {info['torch']}, "
                      f"transformers {info['transformers']}, mzoo {info['mzoo_commit']}; load avg (1 min) "
                      f"{info['loadavg_1m_before']} before / {info['loadavg_1m_after']} after")
                print_table(rows, info)
            if len(results) > 1:
                print()
                print_scaling(results)
        return 0 if all(r.rc == 0 for rows, _ in results for r in rows) else 1
    finally:
        if args.keep:
            print(f"[bench] kept {root}", file=log)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
