"""Issue 17, case 4: two trainings saving into one root. The second fails at start, naming the first
(pid, host), and writes nothing there; a killed run's lock does not block the next one. Real runs:
a 2-process (tp 2) run under the `mzoo` parent, which holds the lock for its workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mzoo.ckpt.runlock import LOCK_NAME, RootBusyError, acquire
from test_signals import MZOO, TRAIN, start, wait_training

import pytest

SHORT = ["train", "llama-tiny", "--mock-data", "--seq-len", "32", "--steps", "2", "--lr", "1e-3", "--warmup", "1"]


def test_second_training_into_the_same_root_fails_fast_and_a_killed_runs_lock_does_not_block(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    first = start(tmp_path, "--save", str(root), "--log-json", str(tmp_path / "log.jsonl"))
    try:
        wait_training(first, tmp_path)
        began = time.time()
        second = subprocess.run([MZOO, *SHORT, "--save", str(root)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=240)
        took = time.time() - began
        assert second.returncode != 0, second.stdout + second.stderr
        err = " ".join(second.stderr.split())
        assert "in use by another training run" in err and f"pid {first.pid}" in err, err
        assert socket.gethostname() in err and "Traceback" not in second.stderr, err
        assert "loss" not in second.stdout, second.stdout  # nothing trained
        assert not list(root.glob("iter_*")), sorted(p.name for p in root.iterdir())
        assert took < 120, took
        assert first.poll() is None  # the first run trains on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    time.sleep(1)  # the killed group's workers are gone
    third = subprocess.run([MZOO, *SHORT, "--save", str(root)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr[-3000:]
    assert (root / "iter_0000002").is_dir() and (root / LOCK_NAME).is_file()


def test_a_lock_file_whose_holder_died_does_not_block(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("pid=999999999\nhost=gone\n")  # left by a killed run
    fd = acquire(tmp_path)
    try:
        assert f"pid={os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
        code = f"from mzoo.ckpt.runlock import acquire; acquire({str(tmp_path)!r})"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and f"pid {os.getpid()} on host" in other.stderr, other.stderr
        with pytest.raises(RootBusyError):
            acquire(tmp_path)  # a second open file description in this process is refused too
    finally:
        os.close(fd)
    os.close(acquire(tmp_path))  # released: free again
