"""Benchmark: what the readers' CRC-32 verification costs (issue 17, readers).

Every reader checks a file against the CRC-32 `mzoo.yaml` records for it (else, for torch archives,
the CRC-32s the archive itself records) before it first reads from it (mzoo/ckpt/integrity.py).
This reads one checkpoint, written on the spot in a temp dir (`mzoo init`, a llama of 12 layers x
hidden 1024 by default, ~0.4 GB bf16, then `mzoo convert hf->megatron` to torch_dist and to legacy
torch at TP2), in each format, in a fresh process per row:

  cat             `cat` of every file of the checkpoint folder > /dev/null: the baseline (the bytes
                  alone, no Python); wall time of the command
  read, CRC off   the reader reads every tensor inside `mzoo.ckpt.integrity.deferred()` (the
                  internal switch `inspect` uses; no user flag skips the check): HFReader.get of each
                  name; DistReader.read of each key; LegacyReader's rank files (memory-mapped), every
                  tensor cloned so its pages are read
  read, CRC on    the same, verified against mzoo.yaml's CRC-32s (what a user gets)
  read, archive   torch_dist and torch only: the same folder hard-linked without mzoo.yaml, so the
                  torch archives' own per-record CRC-32s are checked (Megatron-LM's checkpoints)

`read s` is the time of the reading inside the process (reader construction + every tensor; not the
~2-3 s of `import torch`), so it compares with `cat`. Files are read from a warm page cache (all
files are cat'ed once first): the CRC's cost is CPU, not the disk. Peak RSS is the row's own
process (`/usr/bin/time -f %M`: forked from GNU time's small process, not from this one, whose
high-water mark a direct child's ru_maxrss would inherit), `import torch` included for the readers. Rows run `--repeats` times round-robin; medians, spread (max - min) / median.
`CRC cost` = median over rounds of (on - off) in the same round; `on/off` likewise a ratio.

Usage: .venv/bin/python benchmarks/readers.py [--layers 12] [--hidden 1024] [--repeats 2] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))
from convert import model_yaml  # noqa: E402  (benchmarks/ is not a package)
from proctree import machine_info, print_markdown_table, run_measured  # noqa: E402

GB = 1e9


def read_all(fmt: str, path: Path) -> int:
    """Every tensor of the checkpoint at `path` through mzoo's reader for `fmt`; the bytes read."""
    total = 0
    if fmt == "hf":
        from mzoo.ckpt.hf import HFReader

        reader = HFReader(path)
        for name in reader.names():
            total += reader.get(name).nbytes
    elif fmt == "torch_dist":
        from mzoo.ckpt.dist import DistReader
        from mzoo.ckpt.megatron.tracker import find_iteration_dir

        reader = DistReader(find_iteration_dir(path)[0])
        for key in reader.keys():
            total += reader.read(key).nbytes
    else:
        import torch

        from mzoo.ckpt.legacy import LegacyReader

        reader = LegacyReader(path)
        for rank in sorted(reader.files, key=lambda r: (r[1], r[2], r[0])):
            for chunk, state in reader._load(rank).items():
                if chunk.startswith("model") and isinstance(state, dict):
                    total += sum(t.clone().nbytes for t in state.values() if isinstance(t, torch.Tensor))
    return total


def child(fmt: str, path: str, crc: str) -> None:
    """One row: read everything once, print `seconds bytes`."""
    import mzoo.ckpt.integrity as integrity

    start = time.perf_counter()
    with integrity.deferred() if crc == "off" else contextlib.nullcontext():
        total = read_all(fmt, Path(path))
    print(f"{time.perf_counter() - start:.4f} {total}")


@dataclass
class Row:
    name: str
    argv: list[str]
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    nbytes: int = 0


def files_of(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


TIME = "/usr/bin/time"  # GNU time: forks the row from its own ~2 MB process, so %M is the row's own peak


def measure(row: Row, env: dict, work: Path) -> None:
    """One run of a row; its peak RSS is GNU time's %M (wait4 of a child forked from a small
    process): a child forked straight from this benchmark would report this process's high-water
    mark when that is higher than its own (ru_maxrss keeps the pre-exec mm's)."""
    rss_file = work / "maxrss.txt"
    run = run_measured([TIME, "-f", "%M", "-o", str(rss_file), *row.argv], env)
    if run.rc != 0:
        raise SystemExit(f"{row.name} failed ({run.rc}):\n{run.output}")
    if row.argv[0] == "cat":
        row.times.append(run.wall_s)
    else:
        seconds, nbytes = run.output.split()[-2:]
        row.times.append(float(seconds))
        row.nbytes = int(nbytes)
    row.rss.append(int(rss_file.read_text().split()[-1]) * 1024)


def make_checkpoints(work: Path, layers: int, hidden: int, mzoo: str, env: dict) -> dict[str, Path]:
    """The HF folder, its torch_dist and legacy torch conversions, and those two without mzoo.yaml."""
    (work / "model.yaml").write_text(model_yaml(layers, hidden))
    out = {"hf": work / "hf", "torch_dist": work / "dist", "torch": work / "legacy"}
    commands = [
        [mzoo, "init", str(work / "model.yaml"), str(out["hf"]), "--dtype", "bf16", "--seed", "0"],
        [mzoo, "convert", "hf->megatron", str(out["hf"]), str(out["torch_dist"]), "--tp", "2", "--quiet"],
        [mzoo, "convert", "hf->megatron", str(out["hf"]), str(out["torch"]), "--tp", "2",
         "--megatron-format", "torch", "--quiet"],
    ]
    for argv in commands:
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stdout + done.stderr)
    for fmt in ("torch_dist", "torch"):  # hard links: the same bytes, no mzoo.yaml anywhere above them
        bare = work / f"{out[fmt].name}-bare"
        for f in files_of(out[fmt]):
            if Path(f).name == "mzoo.yaml":
                continue
            target = bare / Path(f).relative_to(out[fmt])
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
        out[f"{fmt} bare"] = bare
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--child", nargs=3, metavar=("FMT", "PATH", "CRC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if not os.access(TIME, os.X_OK):
        parser.error(f"{TIME} (GNU time) is needed to measure each row's own peak RSS; install the 'time' package.")
    py, mzoo = sys.executable, str(Path(sys.executable).with_name("mzoo"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="mzoo-bench-readers-"))
    try:
        paths = make_checkpoints(work, args.layers, args.hidden, mzoo, env)
        me = str(Path(__file__).resolve())
        rows: list[Row] = []
        for fmt in ("hf", "torch_dist", "torch"):
            rows.append(Row(f"{fmt}: cat", ["cat", *files_of(paths[fmt])]))
            rows.append(Row(f"{fmt}: read, CRC off", [py, me, "--child", fmt, str(paths[fmt]), "off"]))
            rows.append(Row(f"{fmt}: read, CRC on", [py, me, "--child", fmt, str(paths[fmt]), "on"]))
            if fmt != "hf":
                rows.append(Row(f"{fmt}: read, archive CRCs", [py, me, "--child", fmt, str(paths[f"{fmt} bare"]), "on"]))
        subprocess.run(["cat", *files_of(work)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        for _ in range(args.repeats):
            for row in rows:
                measure(row, env, work)
        sizes = {fmt: sum(os.path.getsize(f) for f in files_of(paths[fmt])) for fmt in ("hf", "torch_dist", "torch")}
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    info = machine_info(load_before)
    print(f"{info['date']}, mzoo {info['mzoo_commit']}, {info['machine']}, torch {info['torch']}, load average "
          f"{info['loadavg_1m_before']} before / {info['loadavg_1m_after']} after. llama {args.layers}x{args.hidden} "
          f"bf16; folder bytes: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in sizes.items())
          + f"; median of {args.repeats} rounds.\n")
    by_name = {r.name: r for r in rows}
    body = []
    for row in rows:
        fmt = row.name.split(":")[0]
        med = statistics.median(row.times)
        nbytes = row.nbytes or sizes[fmt]
        off = by_name[f"{fmt}: read, CRC off"]
        cat = by_name[f"{fmt}: cat"]
        is_crc = "CRC" in row.name and "off" not in row.name
        cost = statistics.median(a - b for a, b in zip(row.times, off.times)) if is_crc else None
        body.append([
            row.name, f"{med:.3f}", f"{(max(row.times) - min(row.times)) / med:.0%}", f"{nbytes / GB / med:.2f}",
            f"{max(row.rss) / 1e6:.1f}", f"{statistics.median(a / b for a, b in zip(row.times, cat.times)):.2f}",
            "" if cost is None else f"{cost:+.3f}",
            "" if cost is None else f"{statistics.median(a / b for a, b in zip(row.times, off.times)):.2f}",
        ])
    print_markdown_table(["row", "read s", "spread", "GB/s", "peak RSS MB", "vs cat", "CRC cost s", "on/off"], body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
