"""Shared CLI plumbing: one console, user-error handling, JSON output."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from mzoo.errors import UserError
from mzoo.signals import Stopped, install
from mzoo.validate import Rule, check

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


def option_rules(fn: Callable) -> dict[str, tuple[str, Rule]]:
    """{parameter: (flag, rule)} for the options of command `fn` declared with a rule (options.option)."""
    rules = {}
    for name, param in inspect.signature(fn).parameters.items():
        rule = getattr(param.default, "mzoo_rule", None)
        if rule is not None:
            decls = [d for d in getattr(param.default, "param_decls", ()) if d.startswith("--")]
            rules[name] = (decls[0].split("/")[0] if decls else "--" + name.replace("_", "-"), rule)
    return rules


def check_options(fn: Callable, values: dict[str, Any]) -> None:
    """Every ruled option of command `fn` in `values` follows its rule, else one ArgumentError."""
    rules = getattr(fn, "mzoo_rules", None) or option_rules(inspect.unwrap(fn))
    for name, (flag, rule) in rules.items():
        if name in values:
            check(flag, values[name], rule)


def user_errors(fn: Callable) -> Callable:
    """Check the command's option values first (before the command imports torch), then print any
    UserError as one red sentence and exit 2, with no traceback. User text is escaped: a path with
    square brackets is not rich markup. SIGTERM and SIGINT end the command through its normal unwind
    (temporaries removed) with one sentence and 128+signal."""
    rules = option_rules(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        install()
        try:
            check_options(wrapper, kwargs)
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None
        except Stopped as e:
            if getattr(e, "supervised", False):  # a clean stop under mzoo's parent: it reports and exits
                raise typer.Exit(0) from None
            if int(os.environ.get("RANK", "0")) == 0:
                err_console.print(str(e), highlight=False, markup=False)
            raise typer.Exit(e.exit_code) from None

    wrapper.mzoo_rules = rules  # type: ignore[attr-defined]
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
