"""Exact parameter counts from a ModelConfig, without building a model: the planner's cost model
(mzoo.plan.costs) at tp 1 on one stage, on the true vocabulary, tied embeddings once. Tests check them
against the numel of models built on the meta device, and the zoo against published totals."""

from __future__ import annotations

from mzoo.plan.costs import ParamCount, count_params

__all__ = ["ParamCount", "count_params", "human"]


def human(n: int) -> str:
    """8030261248 -> '8.03B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if n / scale < 10 else f"{n / scale:.1f}{unit}"
    return str(n)
