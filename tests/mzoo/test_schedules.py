"""Pipeline schedules over real gloo process groups equal one process running every layer.

A toy model (8 Linear+tanh layers of width 16, seeded) is split into stages as Megatron splits
layers (`stage_layers`: chunk v of rank p holds layer block v * pp + p). Each case checks the
per-microbatch losses and every layer's gradients against a single-process run, that forward_only
gives the same losses and no gradients, and that each rank keeps no more microbatches in flight
than Megatron's warm-up count + 1. Outputs are emptied once sent: the plain variant ends in tanh,
whose backward reads its output (autograd's saved copy keeps that storage, so its gradients must
still be right); the residual variant (each layer x + tanh(Wx + b): a stage's output comes from an
addition, as a decoder layer's does) checks that every sent output was emptied.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from dist import run
from torch import nn

from mzoo.config import ConfigError
from mzoo.layout import Layout
from mzoo.parallel.pipeline import stage_layers
from mzoo.parallel.schedules import (
    _VirtualOrder,
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    pick_schedule,
)
from mzoo.parallel.state import ParallelState

HIDDEN, LAYERS, SEQ, MICRO = 16, 8, 4, 2
SHAPE = (SEQ, MICRO, HIDDEN)
TOL = 1e-6
# (pp, vpp, num_microbatches) per world size; M < pp covers a pipeline that never reaches 1F1B.
CASES = {
    2: [(2, 1, 4), (2, 1, 1), (2, 2, 4), (2, 2, 8)],
    4: [(4, 1, 8), (4, 1, 2), (4, 2, 8), (4, 2, 4)],
}


class Chunk(nn.Module):
    """Some consecutive layers of the toy model; the first reads data, the last computes the loss."""

    def __init__(self, layers: dict[int, nn.Linear], reads_data: bool, computes_loss: bool, residual: bool = False):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})
        self.reads_data, self.computes_loss, self.residual = reads_data, computes_loss, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = x + torch.tanh(layer(x)) if self.residual else torch.tanh(layer(x))
        return x


def toy_layers() -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)]


def toy_batches(num_microbatches: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(num_microbatches, *SHAPE, generator=g), torch.randn(num_microbatches, *SHAPE, generator=g)


def make_forward_step(num_microbatches: int, live: dict | None = None, sent: list | None = None):
    """forward_step for the schedules; `live` counts outputs not yet freed (peak in live['max']);
    `sent` keeps every output sent on (to see whether the schedule emptied it)."""
    data, targets = toy_batches(num_microbatches)

    def forward_step(mb: int, chunk: Chunk, x: torch.Tensor | None) -> torch.Tensor:
        y = chunk(data[mb] if chunk.reads_data else x)
        if chunk.computes_loss:
            y = nn.functional.mse_loss(y, targets[mb]) / num_microbatches
        elif sent is not None:
            sent.append(y)
            return y
        if live is not None:
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
            weakref.finalize(y, _decrement, live)
        return y

    return forward_step


def _decrement(live: dict) -> None:
    live["now"] -= 1


def grads_of(layers: dict[int, nn.Linear]) -> dict[int, list]:
    return {i: [layer.weight.grad.tolist(), layer.bias.grad.tolist()] for i, layer in layers.items()}


def reference(num_microbatches: int, residual: bool = False) -> tuple[list[float], dict[int, list]]:
    """All layers in one process: per-microbatch losses and the gradients of their sum."""
    layers = toy_layers()
    model = Chunk(dict(enumerate(layers)), reads_data=True, computes_loss=True, residual=residual)
    step = make_forward_step(num_microbatches)
    losses = [step(mb, model, None) for mb in range(num_microbatches)]
    torch.stack(losses).sum().backward()
    return [loss.item() for loss in losses], grads_of(dict(enumerate(layers)))


def expected_in_flight(pp: int, vpp: int, rank: int, num_microbatches: int) -> int:
    """Megatron's warm-up count + 1 (the steady-state forward), capped by the microbatches."""
    total = num_microbatches * vpp
    warmup = pp - rank - 1 if vpp == 1 else 2 * (pp - rank - 1) + (vpp - 1) * pp
    return min(warmup + 1, total)


def pipeline_worker(rank: int, world: int, cases: list[tuple[int, int, int]], residual: bool = False) -> list[dict]:
    out = []
    for pp, vpp, num_microbatches in cases:
        state = ParallelState.build(Layout(pp=pp, vpp=vpp))
        layers = toy_layers()
        ranges = stage_layers(LAYERS, pp, vpp)[state.pp_rank]
        owned = {i: layers[i] for r in ranges for i in r}
        chunks = [
            Chunk({i: layers[i] for i in r}, state.is_first_stage and v == 0, state.is_last_stage and v == vpp - 1,
                  residual)
            for v, r in enumerate(ranges)
        ]
        schedule = pick_schedule(state)
        live, sent = {"now": 0, "max": 0}, []
        step = make_forward_step(num_microbatches, None if residual else live, sent if residual else None)
        losses = schedule(step, chunks, num_microbatches, state, SHAPE, torch.float32)
        grads = grads_of(owned)
        for layer in owned.values():
            layer.weight.grad = layer.bias.grad = None
        eval_losses = schedule(
            make_forward_step(num_microbatches), chunks, num_microbatches, state, SHAPE, torch.float32, forward_only=True
        )
        out.append(
            {
                "schedule": schedule.__name__,
                "losses": [x.item() for x in losses],
                "eval_losses": [x.item() for x in eval_losses],
                "grads": grads,
                "eval_grads": any(p.grad is not None for c in chunks for p in c.parameters()),
                "max_in_flight": live["max"],
                "sent": len(sent),
                "freed": sum(y.numel() == 1 for y in sent),
            }
        )
    return out


@pytest.fixture(scope="module")
def results():
    """results(world)[rank][case]: one spawn per world size runs all of its cases, on first use."""
    cache: dict[int, list[list[dict]]] = {}

    def get(world: int) -> list[list[dict]]:
        if world not in cache:
            cache[world] = run(pipeline_worker, world, CASES[world])
        return cache[world]

    return get


def _close(a: list, b: list) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=TOL, rtol=0)


@pytest.mark.dist
@pytest.mark.parametrize("world,case", [(w, i) for w, cases in CASES.items() for i in range(len(cases))])
def test_schedule_matches_single_process(results, world: int, case: int) -> None:
    pp, vpp, num_microbatches = CASES[world][case]
    ref_losses, ref_grads = reference(num_microbatches)
    per_rank = [ranks[case] for ranks in results(world)]
    expected = "with_interleaving" if vpp > 1 else "without_interleaving"
    assert all(r["schedule"].endswith(expected) for r in per_rank)
    # losses only on the last stage, equal to one process, in microbatch order; same when forward_only
    assert all(r["losses"] == [] and r["eval_losses"] == [] for r in per_rank[:-1])
    assert len(per_rank[-1]["losses"]) == num_microbatches
    assert _close(per_rank[-1]["losses"], ref_losses)
    assert _close(per_rank[-1]["eval_losses"], ref_losses)
    # every layer lives on exactly one rank, with the single-process gradient
    merged: dict[int, list] = {}
    for r in per_rank:
        assert not merged.keys() & r["grads"].keys()
        merged.update(r["grads"])
    assert sorted(merged) == list(range(LAYERS))
    for i in range(LAYERS):
        assert _close(merged[i][0], ref_grads[i][0]) and _close(merged[i][1], ref_grads[i][1]), f"layer {i}"
    assert not any(r["eval_grads"] for r in per_rank)
    # activations are freed by their backward: in flight at most Megatron's warm-up count + 1
    assert [r["max_in_flight"] for r in per_rank] == [
        expected_in_flight(pp, vpp, rank, num_microbatches) for rank in range(pp)
    ]


@pytest.mark.dist
@pytest.mark.parametrize("world", sorted(CASES))
def test_outputs_are_freed_once_sent_and_gradients_still_match(world: int) -> None:
    """Megatron's deallocate_pipeline_outputs: every output sent on is emptied, every layer's gradient
    still equals one process (the backward ran through the emptied outputs' autograd nodes)."""
    results = run(pipeline_worker, world, CASES[world], True)
    for case, (pp, vpp, num_microbatches) in enumerate(CASES[world]):
        ref_losses, ref_grads = reference(num_microbatches, residual=True)
        per_rank = [ranks[case] for ranks in results]
        assert _close(per_rank[-1]["losses"], ref_losses)
        merged = {i: g for r in per_rank for i, g in r["grads"].items()}
        for i in range(LAYERS):
            assert _close(merged[i][0], ref_grads[i][0]) and _close(merged[i][1], ref_grads[i][1]), (case, i)
        sent = sum(r["sent"] for r in per_rank)
        assert sent >= num_microbatches * (pp * vpp - 1) and sum(r["freed"] for r in per_rank) == sent, per_rank


def test_no_pipelining_matches_reference() -> None:
    ref_losses, ref_grads = reference(3)
    layers = toy_layers()
    model = Chunk(dict(enumerate(layers)), reads_data=True, computes_loss=True)
    state = ParallelState.single()
    assert pick_schedule(state) is forward_backward_no_pipelining
    losses = forward_backward_no_pipelining(make_forward_step(3), [model], 3, state, SHAPE, torch.float32)
    assert _close([x.item() for x in losses], ref_losses)
    got = grads_of(dict(enumerate(layers)))
    assert all(_close(got[i][0], ref_grads[i][0]) and _close(got[i][1], ref_grads[i][1]) for i in range(LAYERS))


def test_pick_schedule() -> None:
    pick = lambda **kw: pick_schedule(ParallelState.for_rank(Layout(**kw), 0))
    assert pick(pp=1) is forward_backward_no_pipelining
    assert pick(pp=2) is forward_backward_pipelining_without_interleaving
    assert pick(pp=2, vpp=2) is forward_backward_pipelining_with_interleaving


@pytest.mark.parametrize("num_microbatches", [3, 1, 0])
def test_interleaved_rejects_microbatches_not_multiple_of_pp(num_microbatches: int) -> None:
    # The check runs before any communication, so no process group is needed.
    state = ParallelState.for_rank(Layout(pp=2, vpp=2), 0)
    with pytest.raises(ConfigError, match="multiple of the pipeline size pp=2"):
        forward_backward_pipelining_with_interleaving(
            make_forward_step(4), [nn.Identity(), nn.Identity()], num_microbatches, state, SHAPE, torch.float32
        )


def test_schedules_reject_wrong_chunk_counts() -> None:
    state = ParallelState.for_rank(Layout(pp=2, vpp=2), 0)
    with pytest.raises(ConfigError, match="one model chunk per virtual stage"):
        forward_backward_pipelining_with_interleaving(make_forward_step(4), [nn.Identity()], 4, state, SHAPE, torch.float32)
    with pytest.raises(ConfigError, match="one model chunk per rank"):
        forward_backward_pipelining_without_interleaving(
            make_forward_step(4), [nn.Identity(), nn.Identity()], 4, state, SHAPE, torch.float32
        )


@pytest.mark.parametrize("num_microbatches,chunks,pp", [(4, 2, 2), (8, 2, 4), (6, 3, 2), (12, 2, 3)])
def test_interleaved_order_matches_megatron_schedule_table(num_microbatches: int, chunks: int, pp: int) -> None:
    # megatron-core's own table, at its default microbatch group size (pp)
    get_schedule_table = pytest.importorskip("megatron.core.pipeline_parallel.schedules").get_schedule_table
    state = ParallelState.for_rank(Layout(pp=pp, vpp=chunks), 0)
    order = _VirtualOrder(state, num_microbatches, chunks, forward_only=False)
    ours = [(order.microbatch(k), order.chunk(k, forward=True)) for k in range(order.total)]
    assert ours == get_schedule_table(num_microbatches, chunks, pp)
