"""Peak memory of a process tree, sampled from /proc (no psutil): shared by the benchmarks."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass


def tree_pids(root: int) -> list[int]:
    """root and its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_parts(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed + shmem) resident bytes of one process."""
    anon = filed = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(("RssFile:", "RssShmem:")):
                    filed += int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, filed


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds one live process has used (its own threads; not its children)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)
    except (OSError, ValueError, IndexError):
        return 0.0


def is_worker(pid: int) -> bool:
    """A torchrun worker: RANK is in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return b"\0RANK=" in b"\0" + fh.read()
    except OSError:
        return False


class Poller(threading.Thread):
    """Samples the tree's RSS every `interval` seconds; keeps peaks of the whole tree, its anonymous
    and file-backed parts, and of the training workers alone (the root when there are none).

    With `watch` (a file the process appends lines to, e.g. a per-step JSON log), it also records the
    tree's CPU seconds (user + system, summed over its live processes) each time a new line appears:
    `cpu_at_line[n]` is the CPU time when the file first had n lines (to within one interval)."""

    def __init__(self, pid: int, interval: float = 0.05, watch: "str | os.PathLike | None" = None):
        super().__init__(daemon=True)
        self.pid, self.interval, self.watch = pid, interval, watch
        self.stop = threading.Event()
        self.peak_total = self.peak_anon = self.peak_file = self.peak_workers = self.max_procs = 0
        self._workers: dict[int, bool] = {}
        self.cpu_at_line: dict[int, float] = {}
        self._watch_size = -1

    def _watch_lines(self, pids: list[int]) -> None:
        try:
            size = os.stat(self.watch).st_size
        except OSError:
            return
        if size == self._watch_size:
            return
        self._watch_size = size
        try:
            with open(self.watch, "rb") as fh:
                n = fh.read().count(b"\n")
        except OSError:
            return
        if n and n not in self.cpu_at_line:
            cpu = sum(cpu_seconds(p) for p in pids)
            for k in range(1, n + 1):  # lines that appeared within one interval share the sample
                self.cpu_at_line.setdefault(k, cpu)

    def run(self) -> None:
        while not self.stop.is_set():
            pids = tree_pids(self.pid)
            if self.watch is not None:
                self._watch_lines(pids)
            anon = filed = workers = 0
            for p in pids:
                a, f = rss_parts(p)
                anon, filed = anon + a, filed + f
                if p not in self._workers:
                    self._workers[p] = is_worker(p)
                if self._workers[p]:
                    workers += a + f
            if not any(self._workers.get(p) for p in pids):
                workers = sum(rss_parts(self.pid))
            self.peak_total = max(self.peak_total, anon + filed)
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, filed)
            self.peak_workers = max(self.peak_workers, workers)
            self.max_procs = max(self.max_procs, len(pids))
            self.stop.wait(self.interval)


@dataclass
class Run:
    wall_s: float
    rc: int
    ru_maxrss: int  # bytes, from wait4 (covers descendants it waited for)
    poller: Poller
    output: str
    cpu_s: float = 0.0  # user + system CPU seconds, from wait4 (covers descendants it waited for)

    @property
    def peak_rss(self) -> int:
        return max(self.ru_maxrss, self.poller.peak_total)


def run_measured(argv: list[str], env: dict, watch: "str | os.PathLike | None" = None) -> Run:
    """argv in its own subprocess: wall time, exit code, peak RSS (wait4 and polled), output; with
    `watch`, the tree's CPU seconds each time that file gains a line (Poller.cpu_at_line)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    poller = Poller(proc.pid, watch=watch)
    poller.start()
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    poller.stop.set()
    poller.join()
    reader.join()
    return Run(wall, rc, usage.ru_maxrss * 1024, poller, b"".join(output).decode(errors="replace").strip(),
               usage.ru_utime + usage.ru_stime)


def machine_info(load_before: float) -> dict:
    """Where and when a benchmark ran, with the 1-minute load average before and after it."""
    import datetime
    import platform

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {
        **versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {ram:.0f} GiB RAM, {platform.system()}",
        "python": platform.python_version(),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def versions() -> dict:
    """torch / transformers versions and the mzoo commit (read-only git calls; "+dirty" when tracked
    files outside benchmarks/ and docs/ differ from HEAD)."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "diff", "--name-only", "HEAD"], capture_output=True, text=True,
                               timeout=10).stdout.split()
        product = [f for f in dirty if not f.startswith(("benchmarks/", "docs/"))]
        mark = "+dirty" if product else " + uncommitted benchmarks/ or docs/" if dirty else ""
        out["mzoo_commit"] = (head + mark) if head else None
        out["mzoo_dirty_files"] = dirty
    except (OSError, subprocess.SubprocessError):
        out["mzoo_commit"], out["mzoo_dirty_files"] = None, []
    return out


def print_markdown_table(headers: list[str], body: list[list[str]], left: tuple[int, ...] = (0,)) -> None:
    """A Markdown table padded to column widths: columns in `left` left-aligned, the rest right."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> None:
        print("| " + " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))) + " |")

    line(headers)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        line(b)
