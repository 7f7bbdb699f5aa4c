"""A byte progress bar and the one-line summary every conversion prints."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from mzoo.cli.common import err_console


@contextmanager
def byte_progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    if quiet:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def summary_line(s) -> str:
    return (f"{s.src_format} -> {s.dst_format} (tp={s.tp} pp={s.pp} vpp={s.vpp} ep={getattr(s, 'ep', 1)}): "
            f"{s.bytes / 1e9:.3f} GB in "
            f"{s.seconds:.2f} s ({s.gb_per_s:.2f} GB/s), peak RSS {s.peak_rss_gb:.2f} GB -> {s.dst}")
