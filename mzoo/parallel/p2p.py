"""Point-to-point exchange of activations and gradients between adjacent pipeline stages.

Mirrors megatron.core.pipeline_parallel.p2p_communication with `batch_p2p_comm=True`: every call
posts all of its sends and receives as one `torch.distributed.batch_isend_irecv` batch and waits
for it, so a send and the matching receive never wait on each other (no deadlock). The stages form
a ring over the state's `pp_ranks` (global ranks): "next" of the last stage is the first stage and
"prev" of the first stage is the last, which is how interleaved (virtual) pipelines hand a
microbatch from the last stage's chunk v to the first stage's chunk v + 1.

Shapes and dtypes are known up front ([seq, micro_batch, hidden] in the engine), so unlike
Megatron's `variable_seq_lengths` path no shape exchange is needed.

Message order. With pp == 2 "next" and "prev" are the same peer, so one batch may carry an
activation and a gradient to the same rank. Each batch lists the forward direction (send next,
recv prev) before the backward direction (send prev, recv next), so both peers post their
messages in the same order (activation, then gradient) and NCCL, which matches same-peer messages
by order, pairs them correctly; gloo also gets a distinct tag per direction. (Megatron's batched
path lists send_prev first, which mismatches them for an interleaved pipeline with pp == 2.)

The 1F1B helpers (recv_forward ... send_backward_recv_forward) skip the ends of the pipeline
themselves; the virtual-pipeline helpers (send_forward_recv_forward, send_backward_recv_backward,
send_forward_backward_recv_forward_backward) do exactly what they are told, because with model
chunks the first and last stages do talk to each other.

NCCL: torch requires the first collective on a group used with batch_isend_irecv to involve all of
its ranks, while a pipeline's first transfer involves only stages 0 and 1. Run one collective on
`state.pp_group` (e.g. a barrier) after building the state, or initialise the process group with
`device_id` so NCCL communicators are created eagerly. gloo has no such rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from mzoo.parallel.state import ParallelState

Shape = Sequence[int]
_FORWARD_TAG = 0  # activations: stage p -> p + 1
_BACKWARD_TAG = 1  # gradients: stage p -> p - 1


def next_rank(state: ParallelState) -> int:
    """Global rank of the following stage (wrapping from the last stage to the first)."""
    return state.pp_ranks[(state.pp_rank + 1) % state.pp]


def prev_rank(state: ParallelState) -> int:
    """Global rank of the preceding stage (wrapping from the first stage to the last)."""
    return state.pp_ranks[(state.pp_rank - 1) % state.pp]


def default_device(state: ParallelState) -> torch.device:
    """Where receive buffers live: this rank's device (its GPU under NCCL, the CPU under gloo)."""
    return state.device


def _outgoing(tensor: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as sent; a wrong shape or dtype would hang or corrupt the peer, so refuse it here."""
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ValueError(
            f"pipeline p2p expects tensors of shape {tuple(shape)} and dtype {dtype}, got "
            f"{tuple(tensor.shape)} {tensor.dtype}; make every stage's output match the declared shape."
        )
    return tensor.detach().contiguous()


def post(
    state: ParallelState,
    *,
    send_next: torch.Tensor | None = None,
    send_prev: torch.Tensor | None = None,
    recv_prev: bool = False,
    recv_next: bool = False,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[dist.Work]]:
    """Post up to four transfers as one batch without waiting: (buffer from prev, buffer from next,
    the batch's works). A buffer may be read, and a sent tensor reused, only after every work of
    its batch has been waited for (the overlapped interleaved schedule does so just in time)."""
    if send_next is None and send_prev is None and not recv_prev and not recv_next:
        return None, None, []
    if state.pp < 2 or state.pp_group is None:
        raise ValueError("pipeline p2p needs a pipeline group (pp > 1) built with ParallelState.build.")
    device = device or default_device(state)
    nxt, prv, group = next_rank(state), prev_rank(state), state.pp_group
    from_prev = torch.empty(tuple(shape), dtype=dtype, device=device) if recv_prev else None
    from_next = torch.empty(tuple(shape), dtype=dtype, device=device) if recv_next else None
    ops = []  # forward direction first, then backward (see the module docstring)
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, _outgoing(send_next, shape, dtype), nxt, group, _FORWARD_TAG))
    if from_prev is not None:
        ops.append(dist.P2POp(dist.irecv, from_prev, prv, group, _FORWARD_TAG))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, _outgoing(send_prev, shape, dtype), prv, group, _BACKWARD_TAG))
    if from_next is not None:
        ops.append(dist.P2POp(dist.irecv, from_next, nxt, group, _BACKWARD_TAG))
    return from_prev, from_next, dist.batch_isend_irecv(ops)


def communicate(
    state: ParallelState,
    *,
    send_next: torch.Tensor | None = None,
    send_prev: torch.Tensor | None = None,
    recv_prev: bool = False,
    recv_next: bool = False,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Megatron's `_communicate`: post up to four transfers as one batch and wait for all of them.

    Returns (tensor received from prev, tensor received from next), None where nothing was asked.
    A tensor received from prev is an activation: a fresh leaf with requires_grad, so the backward
    pass of this stage leaves its gradient in `.grad`.
    """
    from_prev, from_next, works = post(state, send_next=send_next, send_prev=send_prev, recv_prev=recv_prev,
                                       recv_next=recv_next, shape=shape, dtype=dtype, device=device)
    for work in works:
        work.wait()
    if from_prev is not None:
        from_prev.requires_grad_()
    return from_prev, from_next


# ---- 1F1B (non-interleaved): the ends of the pipeline skip what they have no peer for -----------
def recv_forward(
    state: ParallelState, shape: Shape, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor | None:
    """Input activation from the previous stage; None on the first stage (it reads data instead)."""
    if state.is_first_stage:
        return None
    return communicate(state, recv_prev=True, shape=shape, dtype=dtype, device=device)[0]


def recv_backward(
    state: ParallelState, shape: Shape, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor | None:
    """Gradient of this stage's output from the next stage; None on the last stage (it has a loss)."""
    if state.is_last_stage:
        return None
    return communicate(state, recv_next=True, shape=shape, dtype=dtype, device=device)[1]


def send_forward(
    output: torch.Tensor | None, state: ParallelState, shape: Shape, dtype: torch.dtype
) -> None:
    """Output activation to the next stage; nothing on the last stage."""
    if not state.is_last_stage:
        communicate(state, send_next=output, shape=shape, dtype=dtype)


def send_backward(
    input_grad: torch.Tensor | None, state: ParallelState, shape: Shape, dtype: torch.dtype
) -> None:
    """Gradient of this stage's input to the previous stage; nothing on the first stage."""
    if not state.is_first_stage:
        communicate(state, send_prev=input_grad, shape=shape, dtype=dtype)


def send_forward_recv_backward(
    output: torch.Tensor | None,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Send this microbatch's output and receive an output gradient in one batch (1F1B steady state)."""
    if state.is_last_stage:
        return None
    return communicate(state, send_next=output, recv_next=True, shape=shape, dtype=dtype, device=device)[1]


def send_backward_recv_forward(
    input_grad: torch.Tensor | None,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Send an input gradient and receive the next microbatch's input in one batch (1F1B steady state)."""
    if state.is_first_stage:
        return None
    return communicate(state, send_prev=input_grad, recv_prev=True, shape=shape, dtype=dtype, device=device)[0]


# ---- interleaved (virtual) pipeline: the ring wraps around, the caller decides every transfer ----
def send_forward_recv_forward(
    output: torch.Tensor | None,
    recv_prev: bool,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Send an activation to the next stage (if any) and receive one from the previous (if asked)."""
    return communicate(state, send_next=output, recv_prev=recv_prev, shape=shape, dtype=dtype, device=device)[0]


def send_backward_recv_backward(
    input_grad: torch.Tensor | None,
    recv_next: bool,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Send a gradient to the previous stage (if any) and receive one from the next (if asked)."""
    return communicate(state, send_prev=input_grad, recv_next=recv_next, shape=shape, dtype=dtype, device=device)[1]


def send_forward_backward_recv_forward_backward(
    output: torch.Tensor | None,
    input_grad: torch.Tensor | None,
    recv_prev: bool,
    recv_next: bool,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """All four transfers of one interleaved 1F1B step in one batch: (input received, output grad received)."""
    return communicate(
        state,
        send_next=output,
        send_prev=input_grad,
        recv_prev=recv_prev,
        recv_next=recv_next,
        shape=shape,
        dtype=dtype,
        device=device,
    )
