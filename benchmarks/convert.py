"""Benchmark: checkpoint conversion speed and memory against a plain copy and the naive transformers path.

What it measures, in one run, on a randomly initialised llama-family model of ~1.3 GB (bf16) made on
the spot with `mzoo init` (no network, HF_HUB_OFFLINE=1):

  interpreter   python -c "import torch, transformers, mzoo.converters"   (fixed start-up cost)
  mzoo start-up mzoo --help                                                 (the CLI's own start-up; info)
  plain copy    shutil.copytree of the Hugging Face folder                  (I/O floor; the time target)
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

Run:  .venv/bin/python benchmarks/convert.py
      [--workdir DIR] [--keep] [--layers N] [--hidden H] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))
from proctree import machine_info, run_measured  # noqa: E402  (benchmarks/ is not a package)

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


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_gb(n: int) -> str:
    return f"{n / GB:.2f}"


def print_table(rows: list[Row], info: dict) -> None:
    headers = ["step", "wall s", "wall-interp s", "GB/s", "peak RSS GB", "anon / file GB", "out GB",
               "RSS/budget (<=1)", "time/copy (<=2)"]
    body = []
    for r in rows:
        if r.rc != 0:
            body.append([r.step, "skipped" if r.rc == -1 else "FAILED", "", "", "", "", "", "", f"rc={r.rc}"])
            continue

        def verdict(v: Optional[float], lim: float) -> str:
            return "" if v is None else f"{v:.2f} {'ok' if v <= lim else 'MISS'}"

        body.append([
            r.step,
            f"{r.wall_s:.2f}",
            "" if "net_wall_s" not in r.extra else f"{r.extra['net_wall_s']:.2f}",
            "" if r.throughput_gbs is None else f"{r.throughput_gbs:.2f}",
            fmt_gb(r.peak_rss),
            f"{fmt_gb(r.peak_anon)} / {fmt_gb(r.peak_file)}",
            fmt_gb(r.out_bytes) if r.out_bytes else "",
            verdict(r.rss_budget_ratio, 1.0),
            verdict(r.time_copy_ratio, 2.0),
        ])
    title = (f"convert benchmark: {info['model']} ({info['params_h']} params, {fmt_gb(info['model_bytes'])} GB "
             f"bf16, largest tensor {info['largest_tensor']} = {info['largest_tensor_bytes']:,} B); "
             f"RSS budget = {fmt_gb(info['interp_rss'])} + 3 x {fmt_gb(info['largest_tensor_bytes'])} "
             f"= {fmt_gb(info['rss_budget'])} GB")
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(title)
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        print(line(b))
    print("wall-interp = wall time minus the interpreter row (rough cost net of start-up; targets use raw wall).")
    print("peak RSS = max(ru_maxrss from os.wait4, polled sum over the process tree); anon / file = polled peaks "
          "of RssAnon and RssFile+RssShmem (file = mmapped/page-cache pages counted in RSS).")
    for r in rows:
        if r.rc != 0:
            print(f"\n{r.step} failed ({r.command}):\n{r.error}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the model and outputs")
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (default 12 -> ~1.34 GB)")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    args = ap.parse_args(argv)
    if args.layers < 2:
        ap.error("--layers must be at least 2 (the mzoo rows use PP2)")
    if args.hidden < 256 or args.hidden % 256:
        ap.error("--hidden must be a multiple of 256 (even head count for TP2)")

    py = sys.executable
    mzoo = shutil.which("mzoo", path=str(Path(py).parent)) or shutil.which("mzoo")
    if mzoo is None:
        print("cannot find the mzoo command next to", py, file=sys.stderr)
        return 2
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="mzoo-bench-", dir=args.workdir))
    else:
        work = Path(tempfile.mkdtemp(prefix="mzoo-bench-"))
    log = sys.stderr
    try:
        cfg = work / "model.yaml"
        cfg.write_text(model_yaml(args.layers, args.hidden))
        hf = work / "hf"
        print(f"[bench] writing model to {hf} ...", file=log, flush=True)
        init = subprocess.run([mzoo, "init", str(cfg), str(hf), "--dtype", "bf16", "--seed", "0", "--json"],
                              env=env, capture_output=True, text=True)
        if init.returncode != 0:
            print(init.stdout + init.stderr, file=sys.stderr)
            return 1
        params = json.loads(init.stdout)["params"]
        model_bytes, largest, largest_name, n_tensors = safetensors_stats(hf)

        steps: list[tuple[str, list[str], Optional[Path]]] = [
            ("interpreter", [py, "-c", "import torch, transformers, mzoo.converters"], None),
            ("mzoo start-up (--help)", [mzoo, "--help"], None),
            ("plain copy", [py, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                            str(hf), str(work / "copy")], work / "copy"),
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
        rows: list[Row] = []
        for name, cmd, out in steps:
            if name == "mzoo torch_dist->hf" and any(r.step == "mzoo hf->torch_dist" and r.rc for r in rows):
                rows.append(Row(step=name, command=" ".join(cmd), rc=-1, error="skipped: its source step failed"))
                continue
            print(f"[bench] {name} ...", file=log, flush=True)
            r = measure(name, cmd, env, out)
            print(f"[bench]   {r.wall_s:.2f} s, peak RSS {fmt_gb(r.peak_rss)} GB, rc {r.rc}", file=log, flush=True)
            rows.append(r)

        by = {r.step: r for r in rows}
        interp, copy = by["interpreter"], by["plain copy"]
        budget = interp.peak_rss + 3 * largest
        if by.get("mzoo start-up (--help)") and by["mzoo start-up (--help)"].rc == 0:
            su = by["mzoo start-up (--help)"]
            su.extra["net_wall_s"] = round(su.wall_s - interp.wall_s, 3)
        for r in rows:
            if r.rc != 0 or r.out_bytes == 0:  # interpreter / start-up rows move no data
                continue
            r.throughput_gbs = model_bytes / GB / r.wall_s
            if r.step.startswith("mzoo"):
                r.rss_budget_ratio = r.peak_rss / budget
                if copy.rc == 0:
                    r.time_copy_ratio = r.wall_s / copy.wall_s
            if not r.step.startswith("plain copy"):  # the copies run a bare interpreter, no torch import
                r.extra["net_wall_s"] = round(r.wall_s - interp.wall_s, 3)

        info = {
            **machine_info(load_before[0]),
            "model": f"llama {args.layers}x{args.hidden}",
            "params": params,
            "params_h": f"{params / 1e9:.3f} B" if params >= 1e9 else f"{params / 1e6:.0f} M",
            "tensors": n_tensors,
            "model_bytes": model_bytes,
            "largest_tensor": largest_name,
            "largest_tensor_bytes": largest,
            "interp_rss": interp.peak_rss,
            "rss_budget": budget,
            "copy_wall_s": copy.wall_s,
        }
        if args.json:
            print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
        else:
            print(f"{info['date']}  {info['machine']}  python {info['python']}  load avg (1 min) "
                  f"{info['loadavg_1m_before']} before / {info['loadavg_1m_after']} after")
            print_table(rows, info)
        return 0 if all(r.rc == 0 for r in rows) else 1
    finally:
        if args.keep:
            print(f"[bench] kept {work}", file=log)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
