"""Argument checking: the rules an option's value must follow, and the one sentence when it does not.

Kept free of torch (and of anything heavy) so that the CLI can refuse a bad value in well under a
second, before a command imports its job."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mzoo.errors import UserError


class ArgumentError(UserError):
    """A command-line option (or a job request field) has a value it cannot take."""


@dataclass(frozen=True)
class Rule:
    """`test(value)` is true for values allowed; `want` finishes "FLAG must be ..."."""

    test: Callable[[Any], bool]
    want: str


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


POSITIVE = Rule(lambda v: _number(v) and v >= 1, "at least 1")
NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "0 or more")
FINITE = Rule(_number, "a finite number")
FINITE_NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "a finite number, 0 or more")
FINITE_POSITIVE = Rule(lambda v: _number(v) and v > 0, "a finite number above 0")
PROBABILITY = Rule(lambda v: _number(v) and 0 < v <= 1, "above 0 and at most 1")
FRACTION = Rule(lambda v: _number(v) and 0 <= v < 1, "at least 0 and below 1")
PORT = Rule(lambda v: _number(v) and 1 <= v <= 65535, "a port number from 1 to 65535")


def check(flag: str, value: Any, rule: Rule) -> None:
    """Raise ArgumentError naming `flag` when `value` breaks `rule` (None: not given, nothing to check)."""
    if value is not None and not rule.test(value):
        raise ArgumentError(f"{flag} must be {rule.want}, got {value}.")


def check_all(values: dict[str, tuple[Any, Optional[Rule]]]) -> None:
    """check() every {flag: (value, rule)}; a None rule means the option has none."""
    for flag, (value, rule) in values.items():
        if rule is not None:
            check(flag, value, rule)
