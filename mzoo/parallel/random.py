"""Tensor-parallel-aware random streams (Megatron's CudaRNGStatesTracker, for any device).

Dropout on activations every TP rank holds in full (hidden dropout without sequence parallelism)
must draw the same mask on every TP rank: it uses the default generator, seeded alike on all of
them. Dropout on activations split over TP (attention probabilities of this rank's heads, or the
sequence chunk under sequence parallelism) must differ per rank: it runs inside
`tracker.fork()`, a stream seeded with seed + 2718 + tp_rank, as Megatron seeds it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

MODEL_PARALLEL = "model-parallel-rng"


def _device_rng_get(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _device_rng_set(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@dataclass
class RNGTracker:
    """Named generator states of the device the activations live on (the CPU or this rank's GPU)."""

    states: dict[str, torch.Tensor] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    recomputing: bool = False  # inside checkpoint_with_rng's recomputation: forward side effects must not repeat

    def _get(self) -> torch.Tensor:
        return _device_rng_get(self.device)

    def _set(self, state: torch.Tensor) -> None:
        _device_rng_set(state, self.device)

    def add(self, name: str, seed: int) -> None:
        """A new stream seeded with `seed`; only this device's generator is touched, and restored."""
        saved = self._get()
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        self.states[name] = self._get()
        self._set(saved)

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        if name not in self.states:  # not seeded (single process, no dropout setup): default stream
            yield
            return
        saved = self._get()
        self._set(self.states[name])
        try:
            yield
        finally:
            self.states[name] = self._get()
            self._set(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"default": self._get(), **{f"tracker/{k}": v for k, v in self.states.items()}}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self._set(sd["default"])
        self.states = {k.split("/", 1)[1]: v for k, v in sd.items() if k.startswith("tracker/")}


def seed_everything(tracker: RNGTracker, seed: int, tp_rank: int, pp_rank: int) -> None:
    """Megatron's seeding: default stream seed + 100 * pp_rank (same on every TP and DP rank of a
    stage), model-parallel stream that + 2718 + tp_rank."""
    base = seed + 100 * pp_rank
    torch.manual_seed(base)
    tracker.add(MODEL_PARALLEL, base + 2718 + tp_rank)


def checkpoint_with_rng(fn, *args, tracker: RNGTracker):
    """torch.utils.checkpoint that also replays the tracker's streams on recomputation, so dropout
    inside `fn` draws the same masks twice (Megatron's CheckpointFunction does the same)."""
    from torch.utils.checkpoint import checkpoint

    if torch.compiler.is_compiling():  # inside a compiled layer: dynamo traces plain checkpoint as a
        # higher-order op and the partitioner recomputes `fn` in backward. It cannot trace a custom
        # context_fn, and needs none here: `--compile` refuses selective recomputation of a region
        # that draws random numbers (attention dropout), and no other recomputed region draws any.
        return checkpoint(fn, *args, use_reentrant=False)
    snapshot = {k: v.clone() for k, v in tracker.states.items()}

    @contextmanager
    def forward_ctx():
        yield

    @contextmanager
    def recompute_ctx():
        after = tracker.states
        tracker.states = {k: v.clone() for k, v in snapshot.items()}
        tracker.recomputing = True
        try:
            yield
        finally:
            tracker.states, tracker.recomputing = after, False

    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (forward_ctx(), recompute_ctx()))
