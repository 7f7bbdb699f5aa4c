"""What `train` and `finetune` print: the layout, what --load read, one line per step, and the final
losses (JSON) or where the model was saved; and `train --dry-run`'s report.

One output policy: the layout, the loaded checkpoint, step lines and the summary go to stdout (with
--json, only the JSON does); warnings and the progress bar go to stderr, the bar only when stdout is
not a terminal (in one, the step lines are the progress)."""

from __future__ import annotations

import os
import sys

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from mzoo.cli.common import console, err_console, print_json
from mzoo.jobs.plan import DryRun
from mzoo.jobs.train import Prepared, needs_launcher, relaunch, start
from mzoo.train.run import in_launcher, summary
from mzoo.train.trainer import StepLog


def step_line(log: StepLog) -> str:
    mfu = f"  MFU {log.mfu:.1%}" if log.mfu is not None else ""
    skip = "  (skipped: overflow)" if log.skipped else ""
    skip += f"  val_loss {log.val_loss:.4f}" if log.val_loss is not None else ""
    return (f"step {log.step:4d}  loss {log.loss:.4f}  lr {log.lr:.2e}  grad_norm {log.grad_norm:.3f}  "
            f"{log.tokens_per_s:,.0f} tok/s  {log.tflops_per_device:.3f} TFLOP/s{mfu}{skip}")


def execute(prepared: Prepared, as_json: bool) -> None:
    """Relaunch under torchrun when the layout needs more processes, else run here."""
    for note in prepared.notes:
        err_console.print(note, highlight=False, markup=False)
    rank = int(os.environ.get("RANK", 0))
    loaded = prepared.loaded.as_dict() if prepared.loaded else None
    if prepared.nothing_to_train:  # checked before any launch: no process starts, nothing is rewritten
        if as_json:
            print_json({"layout": summary(prepared.run), "loaded": loaded, "nothing_to_train": True, "losses": []})
        else:
            console.print(prepared.loaded.line(), highlight=False)
            console.print(f"already at step {prepared.loaded.step} (the target); nothing to train", highlight=False)
        return
    if prepared.loaded and not as_json and not in_launcher():
        console.print(prepared.loaded.line(), highlight=False)
    if needs_launcher(prepared):
        if not as_json:
            console.print(f"layout: {summary(prepared.run)}", highlight=False)
        outcome = relaunch(prepared, sys.argv[2:])
        if outcome.message:
            label = "[bold red]error:[/] " if outcome.error else ""
            err_console.print(label + escape(outcome.message), highlight=False)
        raise typer.Exit(outcome.code)
    if rank == 0 and not as_json and not in_launcher():
        console.print(f"layout: {summary(prepared.run)}", highlight=False)
    command = prepared.command
    bar = Progress(TextColumn(command), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True, redirect_stdout=False, redirect_stderr=False,
                   disable=rank != 0 or as_json or console.is_terminal)
    task = bar.add_task(command, total=prepared.run.train.steps)

    def show(log: StepLog) -> None:
        bar.update(task, completed=log.step)
        if rank == 0 and not as_json:
            console.print(step_line(log), highlight=False)

    with bar:
        logs = start(prepared, show)
    if rank == 0:
        if as_json:
            print_json({"layout": summary(prepared.run), "loaded": loaded, "losses": [log.loss for log in logs],
                        "val_losses": {log.step: log.val_loss for log in logs if log.val_loss is not None}})
        elif prepared.saved:
            console.print(prepared.saved, highlight=False, markup=False)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def print_dry_run(report: DryRun, as_json: bool) -> None:
    """`train --dry-run`: one rank's coordinates, layers, parameter tensors and memory estimate."""
    if as_json:
        print_json(report.as_dict())
        return
    where = ", ".join(f"{k} {v}" for k, v in report.coordinates.items())
    console.print(f"[bold]dry run[/]: rank {report.rank} of {report.layout.world_size} ({where}); nothing "
                  "allocated, nothing launched", highlight=False)
    layers = report.stage.layers
    console.print(f"layers {layers[0]}..{layers[-1]} ({len(layers)})" if layers else "no layers", highlight=False)
    frozen = f" ({report.trainable:,} trainable)" if report.trainable != report.count else ""
    table = Table(title=f"{len(report.parameters)} parameter tensors, {report.count:,} elements{frozen}")
    for col in ("name", "shape", "numel"):
        table.add_column(col, justify="right" if col == "numel" else "left")
    for p in report.parameters:
        table.add_row(p["name"], "x".join(map(str, p["shape"])), f"{p['numel']:,}")
    console.print(table)
    mem = report.memory
    parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in mem.parts().items() if v)
    console.print(f"memory estimate ({report.profile.name}, mzoo's engine on {report.device}): {_size(mem.total)} = "
                  f"{parts}", highlight=False)
