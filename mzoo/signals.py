"""One signal policy for every long command, and the heartbeats a supervising parent watches.

SIGTERM (what `kill`, `timeout` and Slurm send before preemption) and SIGINT (Ctrl-C) raise
`Stopped`, a KeyboardInterrupt, so every `finally` and context manager on the stack unwinds and
removes its temporaries; the CLI turns it into one sentence and exit code 128+signal. Training
cannot stop at an arbitrary line (a rank leaving mid-collective hangs the others), so while its
loop runs `StopFlag` only records the signal, and the loop agrees on a step across ranks, saves
it and raises `Stopped` itself.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

HANDLED = (signal.SIGTERM, signal.SIGINT)
WATCHDOG_EXIT = 124  # like `timeout`: the job was ended for making no progress
RUN_DIR_ENV = "MZOO_RUN_DIR"  # set by the supervising parent: heartbeats and the stop report go here
PARENT_ENV = "MZOO_SUPERVISOR_PID"  # the parent's pid: workers stop when it is gone
PARENT_GONE = int(signal.SIGHUP)  # the stop reason recorded when the parent died


class Stopped(KeyboardInterrupt):
    """A command ended by a signal; `str()` is the sentence to print."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal_name(signum)} before the command finished; run it again.")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    if signum == PARENT_GONE:
        return "the death of the mzoo parent process"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _raise(signum: int, frame: object) -> None:
    raise Stopped(signum)


def install() -> None:
    """SIGTERM and SIGINT raise `Stopped` (main thread only; elsewhere Python cannot install handlers)."""
    if threading.current_thread() is threading.main_thread():
        for sig in HANDLED:
            signal.signal(sig, _raise)



@contextmanager
def workers_forked() -> Iterator[None]:
    """Fork worker processes inside this block: SIGTERM and SIGINT are blocked in this thread, so in
    every process it forks and every thread it starts (a pool's helper threads, which restart dead
    workers), until a worker's initializer calls `worker_defaults()`. A worker forked with `install()`'s
    handler turns the pool's SIGTERM into `Stopped`, which Python may raise where it is swallowed (a
    `__del__`, a library's broad except): the worker lives on and `Pool.terminate()` waits for it
    forever. A signal sent to this thread meanwhile is delivered when the block ends (one sent to the
    process may be taken by another thread and raise here as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_defaults() -> None:
    """In a worker forked under `workers_forked()`: SIGTERM kills it at once (the kernel's default
    action, so the parent's terminate always works), SIGINT is left to the parent (Ctrl-C reaches the
    whole process group; the parent unwinds and ends its workers); then the signals are unblocked. A
    parent killed outright needs nothing here: its pool's task pipe closes and the workers exit."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

class StopFlag:
    """Records SIGTERM/SIGINT instead of raising, and notices a supervising parent's death."""

    def __init__(self) -> None:
        self.signum = 0
        parent = os.environ.get(PARENT_ENV)
        self.parent = int(parent) if parent and parent.isdigit() else None

    def _record(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum

    def pending(self) -> int:
        """The signal to stop for, 0 when none (a dead parent counts as PARENT_GONE)."""
        if not self.signum and self.parent is not None and not _alive(self.parent):
            self.signum = PARENT_GONE
        return self.signum

    @contextmanager
    def armed(self) -> Iterator["StopFlag"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._record) for sig in HANDLED}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- heartbeats ------------------------------------------------------------------------------------------
def heartbeat_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank_{rank:05d}.json"


class Heartbeat:
    """One rank's heartbeat: a thread rewrites `rank_XXXXX.json` every second with the pid, the last
    step and when it ended. The file's mtime says the process is alive (a frozen process stops its
    thread too); the step time says it makes progress (a rank waiting in a collective is alive but
    not progressing). Without a supervising parent (no MZOO_RUN_DIR) it does nothing."""

    def __init__(self, rank: int, every: float = 1.0):
        run_dir = os.environ.get(RUN_DIR_ENV)
        self.file = heartbeat_file(Path(run_dir), rank) if run_dir else None
        self.step, self.progress, self.every = 0, time.time(), every
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Heartbeat":
        if self.file is not None:
            self._write()
            self._thread = threading.Thread(target=self._loop, name="mzoo-heartbeat", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step, self.progress = step, time.time()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._done.wait(self.every):
            self._write()

    def _write(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"pid": os.getpid(), "step": self.step, "progress": self.progress}))
            os.replace(tmp, self.file)
        except OSError:  # the parent removed the run folder: it is ending the job
            pass


def write_stop_report(signum: int, step: int, saved: Optional[str], hf: bool = False) -> None:
    """Rank 0 tells the supervising parent why the workers ended cleanly (the parent prints it)."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        (Path(run_dir) / "stopped.json").write_text(json.dumps({"signal": signum, "step": step, "saved": saved,
                                                                "hf": hf}))


def stop_sentence(signum: int, step: int, saved: Optional[str], hf: bool = False) -> str:
    """What a stopped run saved: a Megatron iteration (which --load resumes, optimizer and all), or a
    Hugging Face folder of weights (finetuning's default), replaced at each save, with no schedule to resume."""
    if not saved:
        where = "nothing saved (no --save was given)"
    elif hf:
        where = f"saved the model at step {step} as a Hugging Face folder to {saved} (weights only)"
    else:
        where = f"saved iteration {step} to {saved}; resume with --load {saved}"
    return f"stopped by {signal_name(signum)} at step {step}; {where}."
