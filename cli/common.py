"""Shared CLI plumbing: one console, user-error handling, JSON output."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, Callable

import typer
from rich.console import Console

from mzoo.errors import UserError
from mzoo.signals import Stopped, install

console = Console()
if not console.is_terminal:  # pipes and logs: do not squeeze tables into 80 columns
    console = Console(width=200)
err_console = Console(stderr=True)
if not err_console.is_terminal:
    err_console = Console(stderr=True, width=400)  # one error, one line, in logs


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would drown mzoo's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def user_errors(fn: Callable) -> Callable:
    """Print a UserError as one red sentence and exit 2, with no traceback; SIGTERM and SIGINT end
    the command through its normal unwind (temporaries removed) with one sentence and 128+signal."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        install()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
        except Stopped as e:
            if getattr(e, "supervised", False):  # a clean stop under mzoo's parent: it reports and exits
                raise typer.Exit(0) from None
            if int(os.environ.get("RANK", "0")) == 0:
                err_console.print(str(e), highlight=False, markup=False)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def finite_json(data: Any) -> Any:
    """`data` with NaN and infinities as null: JSON has no such numbers, and `Infinity` breaks strict
    readers (jq, JSON.parse)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(finite_json(data), indent=2, allow_nan=False) + "\n")
