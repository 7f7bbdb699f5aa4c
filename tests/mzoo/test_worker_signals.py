"""Worker pools under mzoo's signal policy (mzoo.signals.workers_forked / worker_defaults): workers
take SIGTERM's default action and leave SIGINT to the parent, and a signal sent to the forking thread
meanwhile is delivered once the pool exists."""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time

import pytest

from mzoo.signals import Stopped, install, worker_defaults, workers_forked


def _dispositions(_: int) -> tuple:
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_workers_get_default_sigterm_and_leave_sigint_to_the_parent():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    install()  # what the parent has: SIGTERM raises Stopped
    try:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        with workers_forked():
            pool = mp.get_context("fork").Pool(2, initializer=worker_defaults)
        try:
            for term, intr, blocked in pool.map(_dispositions, range(4)):
                assert term == signal.SIG_DFL and intr == signal.SIG_IGN and not blocked & {signal.SIGTERM, signal.SIGINT}
        finally:
            pool.terminate()
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # the parent's mask is back
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_signal_while_forking_reaches_the_parent_after():
    previous = signal.getsignal(signal.SIGTERM)
    install()
    try:
        with pytest.raises(Stopped):
            with workers_forked():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                time.sleep(0.05)  # blocked: nothing raised here
                reached = True
        assert reached
    finally:
        signal.signal(signal.SIGTERM, previous)
