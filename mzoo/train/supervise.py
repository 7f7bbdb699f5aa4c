"""The parent of a multi-process run: start torchrun in its own session, forward SIGTERM/SIGINT to
the workers (not to torchrun, whose own handler would kill them 30 s later with a traceback), and
end the job when a rank stops making progress (the watchdog).

Workers find the parent through two environment variables (mzoo.signals): a run folder where each
writes its heartbeat and rank 0 its stop report, and the parent's pid, which they poll each step so
that a parent killed outright leaves no training behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from mzoo.signals import (HANDLED, PARENT_ENV, RUN_DIR_ENV, WATCHDOG_EXIT, heartbeat_file, signal_name,
                          stop_sentence)

FROZEN_AFTER = 5.0  # seconds without a heartbeat write: the process itself is not running
STARTUP = 300.0  # at least this long for a worker to import torch and write its first heartbeat


@dataclass(frozen=True)
class Outcome:
    code: int
    message: Optional[str] = None  # one sentence for stderr
    error: bool = False  # the message is an error (the watchdog), not a report


@dataclass(frozen=True)
class Beat:
    pid: int
    step: int
    progress: float  # wall time of the last step's end (or of the start)
    written: float  # the file's mtime: the process was running then


def read_beats(run_dir: Path, ranks: Sequence[int]) -> dict[int, Beat]:
    beats = {}
    for rank in ranks:
        file = heartbeat_file(run_dir, rank)
        try:
            data, written = json.loads(file.read_text()), file.stat().st_mtime
        except (OSError, ValueError):
            continue
        beats[rank] = Beat(int(data["pid"]), int(data["step"]), float(data["progress"]), written)
    return beats


def stalled(beats: dict[int, Beat], ranks: Sequence[int], started: float, limit: float, now: float) -> Optional[str]:
    """The watchdog's verdict: None while every rank progressed within `limit` seconds, else the
    sentence naming the rank(s) to blame: those not running at all (frozen, stopped, never started),
    else those behind the others."""
    stale = [r for r in ranks if (now - beats[r].progress > limit if r in beats
                                  else now - started > max(limit, STARTUP))]
    if not stale:
        return None
    frozen = [r for r in stale if r not in beats or now - beats[r].written > FROZEN_AFTER]
    if frozen:
        blamed = frozen
        why = "and is not running (frozen, stopped or never started)" if len(frozen) == 1 else (
            "and are not running (frozen, stopped or never started)")
    else:
        low = min(beats[r].step for r in stale)
        blamed, why = [r for r in stale if beats[r].step == low], "while waiting (a hung collective or I/O)"
    who = " and ".join(f"rank {r} " + (f"(last step {beats[r].step})" if r in beats else "(no heartbeat)")
                       for r in blamed)
    return (f"{who} made no progress for {limit:g} s {why}; ended the job: raise --watchdog (seconds, 0 turns "
            "it off) if its steps, evaluations or saves take longer.")


def descendants(pid: int) -> list[int]:
    """Every live process under `pid`, from /proc (torchrun starts each worker in a session of its
    own, so its process group does not reach them)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for kid in kids.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


def _kill_group(proc: subprocess.Popen, workers: Sequence[int] = ()) -> None:
    """SIGKILL torchrun, every process under it and the workers that reported a pid (a stopped
    process dies of SIGKILL too)."""
    everyone = set(workers) | (set(descendants(proc.pid)) if Path("/proc/self/stat").exists() else set())
    for pid in [proc.pid, *everyone]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def supervise(command: Sequence[str], ranks: Sequence[int], watchdog: float, poll: float = 0.5) -> Outcome:
    """Run `command` (torchrun) for the local `ranks` and report how it ended."""
    run_dir = Path(tempfile.mkdtemp(prefix="mzoo-run-"))
    env = {**os.environ, RUN_DIR_ENV: str(run_dir), PARENT_ENV: str(os.getpid())}
    received: list[int] = []
    told: set[int] = set()

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in HANDLED}
    started = time.time()
    try:
        proc = subprocess.Popen(list(command), env=env, start_new_session=True)
        while True:
            try:
                proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            beats = read_beats(run_dir, ranks)
            pids = [beat.pid for beat in beats.values()]
            if len(received) > 1:  # asked twice: do not wait for the save
                _kill_group(proc, pids)
                return Outcome(128 + received[0], f"killed on a second {signal_name(received[-1])}; "
                               "nothing was saved.")
            if received:
                for rank, beat in beats.items():
                    if beat.pid not in told:
                        told.add(beat.pid)
                        _forward(beat.pid, received[0])
                continue  # the workers are saving: no watchdog while they do
            verdict = stalled(beats, ranks, started, watchdog, time.time()) if watchdog > 0 else None
            if verdict:
                _kill_group(proc, pids)
                return Outcome(WATCHDOG_EXIT, verdict, error=True)
        return _ended(proc.returncode, run_dir, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(run_dir, ignore_errors=True)


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _ended(code: int, run_dir: Path, received: list[int]) -> Outcome:
    report = run_dir / "stopped.json"
    if report.exists():
        data = json.loads(report.read_text())
        return Outcome(128 + data["signal"], stop_sentence(data["signal"], data["step"], data["saved"],
                                                           data.get("hf", False)))
    if received:
        return Outcome(128 + received[0], f"stopped by {signal_name(received[0])} before training began; "
                       "nothing was saved.")
    return Outcome(code)
