"""Pipeline-parallel forward/backward schedules, after megatron.core.pipeline_parallel.schedules.

Three schedules with one signature:

    schedule(forward_step, model, num_microbatches, state, shape, dtype, forward_only=False) -> losses

- `forward_step(microbatch_index, model_chunk, input_tensor) -> output_tensor`: `input_tensor` is
  None where the chunk reads data (the first chunk of the first stage), else the activation received
  from the previous stage. On the last chunk of the last stage the output is the scalar loss of that
  microbatch, already divided by `num_microbatches` (Megatron divides inside its forward_step);
  elsewhere it is the hidden tensor of `shape` / `dtype` sent on to the next stage.
- `model`: the model chunks of this rank, one nn.Module unless virtual pipelining (then
  `state.config.vpp` chunks, chunk v holding Megatron's virtual stage v).
- Returns the detached per-microbatch losses, in microbatch order, on the last stage; [] elsewhere.
  Gradients accumulate into the parameters' `.grad` (sum over microbatches, like one big batch).

Backward follows Megatron's backward_step: `torch.autograd.backward(output, grad_from_next_stage)`
(or on the loss), then the input's `.grad` goes upstream. Each stage keeps an activation only from
its forward until its backward, so a stage holds at most its 1F1B in-flight count of microbatches.
With `forward_only` (evaluation) no graph is built at all and nothing is kept.

Outputs are freed once sent (Megatron's deallocate_pipeline_outputs): the backward of a stage needs
its output's autograd node, not its values, so after the send its storage is swapped for one
element and the backward is run through the autograd engine directly (torch.autograd.backward
would compare the gradient's shape with the emptied tensor's). That saves one [seq, batch, hidden]
activation per microbatch in flight. It is safe whatever op made the output: an op that saved its
own output for its backward (tanh, a compiled region) holds its own reference to the storage
(autograd's SavedVariable), so only storage nothing else needs is released: an addition's, which is
how every decoder layer ends (the residual).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mzoo.config import ConfigError
from mzoo.parallel import p2p
from mzoo.parallel.state import ParallelState

ForwardStep = Callable[[int, nn.Module, torch.Tensor | None], torch.Tensor]
Shape = Sequence[int]
Chunks = nn.Module | Sequence[nn.Module]


def _chunks(model: Chunks) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _run_forward(
    forward_step: ForwardStep,
    microbatch: int,
    chunk: nn.Module,
    input_tensor: torch.Tensor | None,
    produces_loss: bool,
    losses: list[torch.Tensor],
    forward_only: bool,
) -> torch.Tensor:
    """One microbatch through one chunk; the last chunk's loss is recorded (Megatron's forward_step)."""
    with torch.no_grad() if forward_only else torch.enable_grad():
        output = forward_step(microbatch, chunk, input_tensor)
    if produces_loss:
        if output.numel() != 1:
            raise ValueError(
                f"the last pipeline stage's forward_step must return a scalar loss, got shape {tuple(output.shape)}."
            )
        losses.append(output.detach())
    return output


def _free_output(output: torch.Tensor | None) -> None:
    """After `output` was sent: keep its autograd node, drop its values (Megatron's
    deallocate_output_tensor). A view is left alone (its storage belongs to another tensor)."""
    if output is not None and output.grad_fn is not None and output._base is None:
        output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def _run_backward(
    input_tensor: torch.Tensor | None, output: torch.Tensor, output_grad: torch.Tensor | None
) -> torch.Tensor | None:
    """Megatron's backward_step: backprop this stage's output, return the gradient of its input.

    An input the output does not depend on gets a zero gradient (its true value) rather than None,
    which would leave the previous stage waiting for a message that never comes.
    """
    if output_grad is not None and output.shape != output_grad.shape:  # freed by _free_output
        torch.autograd.Variable._execution_engine.run_backward(
            tensors=(output,), grad_tensors=(output_grad,), keep_graph=False, create_graph=False, inputs=(),
            allow_unreachable=True, accumulate_grad=True)
    else:
        torch.autograd.backward(output, grad_tensors=output_grad)
    if input_tensor is None:
        return None
    return torch.zeros_like(input_tensor) if input_tensor.grad is None else input_tensor.grad


# ---- pp == 1 -------------------------------------------------------------------------------------
def forward_backward_no_pipelining(
    forward_step: ForwardStep,
    model: Chunks,
    num_microbatches: int,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    forward_only: bool = False,
) -> list[torch.Tensor]:
    """Forward then backward of each microbatch in turn, gradients accumulating (Megatron's pp=1 path).

    `shape` and `dtype` are unused (nothing is communicated); they keep the signature common.
    """
    chunks = _chunks(model)
    if len(chunks) != 1 or state.pp != 1:
        raise ConfigError(
            f"the no-pipelining schedule runs one model chunk with pp=1, got {len(chunks)} chunks and "
            f"pp={state.pp}; use pick_schedule(state) to choose the schedule for this layout."
        )
    losses: list[torch.Tensor] = []
    for mb in range(num_microbatches):
        loss = _run_forward(forward_step, mb, chunks[0], None, True, losses, forward_only)
        if not forward_only:
            _run_backward(None, loss, None)
    return losses


# ---- 1F1B ----------------------------------------------------------------------------------------
def forward_backward_pipelining_without_interleaving(
    forward_step: ForwardStep,
    model: Chunks,
    num_microbatches: int,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    forward_only: bool = False,
) -> list[torch.Tensor]:
    """1F1B (PipeDream-Flush): pp - rank - 1 warm-up forwards, then one forward / one backward per
    step, then the remaining backwards; at most pp - rank microbatches in flight on a rank."""
    chunks = _chunks(model)
    if len(chunks) != 1:
        raise ConfigError(
            f"the 1F1B schedule runs one model chunk per rank, got {len(chunks)}; "
            "use forward_backward_pipelining_with_interleaving for virtual pipeline stages."
        )
    chunk, last = chunks[0], state.is_last_stage
    device = p2p.default_device(state)
    warmup = num_microbatches if forward_only else min(state.pp - state.pp_rank - 1, num_microbatches)
    remaining = num_microbatches - warmup
    inputs: deque[torch.Tensor | None] = deque()
    outputs: deque[torch.Tensor] = deque()
    losses: list[torch.Tensor] = []

    def forward(mb: int, x: torch.Tensor | None) -> torch.Tensor:
        return _run_forward(forward_step, mb, chunk, x, last, losses, forward_only)

    for mb in range(warmup):
        x = p2p.recv_forward(state, shape, dtype, device)
        y = forward(mb, x)
        p2p.send_forward(y, state, shape, dtype)
        if not forward_only:
            inputs.append(x)
            outputs.append(y)
            if not last:
                _free_output(y)
    y = None  # the deque alone holds each output, so its backward frees it

    x = p2p.recv_forward(state, shape, dtype, device) if remaining else None
    for i in range(remaining):  # steady state: only reached when training
        inputs.append(x)
        outputs.append(forward(warmup + i, x))  # no local reference: freed right after its backward
        grad = p2p.send_forward_recv_backward(outputs[-1], state, shape, dtype, device)
        if not last:
            _free_output(outputs[-1])
        input_grad = _run_backward(inputs.popleft(), outputs.popleft(), grad)
        if i == remaining - 1:
            x = None
            p2p.send_backward(input_grad, state, shape, dtype)
        else:
            x = p2p.send_backward_recv_forward(input_grad, state, shape, dtype, device)

    if not forward_only:  # cool-down: the backwards of the warm-up microbatches
        for _ in range(warmup):
            grad = p2p.recv_backward(state, shape, dtype, device)
            input_grad = _run_backward(inputs.popleft(), outputs.popleft(), grad)
            p2p.send_backward(input_grad, state, shape, dtype)
    return losses


# ---- interleaved 1F1B (virtual pipeline) ---------------------------------------------------------
class _InFlight:
    """Overlapped p2p (Megatron's overlap_p2p_comm): batches posted without waiting. A received
    buffer is waited for just before its forward or backward reads it, any other batch when the one
    after next is posted (waits only ever come later than the blocking exchange's, so they cannot
    deadlock where it does not); a sent output is freed once its batch is done; `drain` waits for
    everything left."""

    def __init__(self, state: ParallelState, shape: Shape, dtype: torch.dtype, device: torch.device):
        self.state, self.shape, self.dtype, self.device = state, shape, dtype, device
        self.batches: dict[int, tuple[list, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {}
        self.of: dict[int, int] = {}  # id(received buffer) -> its batch (the batch keeps the buffer alive)
        self.posted = 0

    def post(self, *, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
             recv_prev: bool = False, recv_next: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        for key in sorted(self.batches)[:-1]:  # all but the latest batch: done, or a send to finish now
            self._finish(key)
        x, g, works = p2p.post(self.state, send_next=send_next, send_prev=send_prev, recv_prev=recv_prev,
                               recv_next=recv_next, shape=self.shape, dtype=self.dtype, device=self.device)
        key, self.posted = self.posted, self.posted + 1
        self.batches[key] = (works, send_next, x, g)
        for t in (x, g):
            if t is not None:
                self.of[id(t)] = key
        return x, g

    def ready(self, t: torch.Tensor | None) -> None:
        key = self.of.pop(id(t), None) if t is not None else None
        if key is not None and key in self.batches:
            self._finish(key)

    def _finish(self, key: int) -> None:
        works, sent, received, _ = self.batches.pop(key)
        for work in works:
            work.wait()
        _free_output(sent)
        if received is not None:
            received.requires_grad_()

    def drain(self) -> None:
        for key in sorted(self.batches):
            self._finish(key)
        self.of.clear()


class _VirtualOrder:
    """Megatron's schedule table for microbatch groups of pp (its default group size).

    Virtual microbatch k runs, in forward, chunk (k mod pp*V) // pp on microbatch
    (k // pp*V) * pp + k mod pp: pp microbatches through chunk 0, the same pp through chunk 1, ...
    Backward walks the chunks in reverse. Virtual ids past the end wrap around, as in Megatron.
    """

    def __init__(self, state: ParallelState, num_microbatches: int, num_chunks: int, forward_only: bool):
        self.pp, self.rank, self.chunks = state.pp, state.pp_rank, num_chunks
        self.first, self.last = state.is_first_stage, state.is_last_stage
        self.total = num_microbatches * num_chunks
        if forward_only:
            warmup = self.total
        else:
            warmup = (self.pp - self.rank - 1) * 2 + (num_chunks - 1) * self.pp
        self.warmup = min(warmup, self.total)
        self.all_warmup = warmup >= self.total
        self.remaining = self.total - self.warmup

    def chunk(self, k: int, forward: bool) -> int:
        v = (k % self.total) % (self.pp * self.chunks) // self.pp
        return v if forward else self.chunks - 1 - v

    def microbatch(self, k: int) -> int:
        return k // (self.pp * self.chunks) * self.pp + k % self.pp

    def is_loss_chunk(self, v: int) -> bool:
        return self.last and v == self.chunks - 1

    def is_data_chunk(self, v: int) -> bool:
        return self.first and v == 0

    def receives(self, k: int, forward: bool) -> tuple[bool, int]:
        """Megatron's recv_tensor_from_previous_stage: after virtual step k, does a tensor arrive
        (from prev in forward, from next in backward), and for which chunk?"""
        leading = self.first if forward else self.last
        if not leading:
            return True, self.chunk(k + 1, forward)
        # The leading stage is pp - 1 steps ahead of the stage that feeds it around the ring.
        recv = k >= self.pp - 1
        source = self.chunk(k - (self.pp - 1), forward) if recv else self.chunk(k + 1, forward)
        if source == (self.chunks - 1 if forward else 0):
            recv = False  # the source chunk is the end of the model: it sends nothing round the ring
        return recv, source + (1 if forward else -1)


def forward_backward_pipelining_with_interleaving(
    forward_step: ForwardStep,
    model: Chunks,
    num_microbatches: int,
    state: ParallelState,
    shape: Shape,
    dtype: torch.dtype,
    forward_only: bool = False,
    overlap_p2p: bool = True,
) -> list[torch.Tensor]:
    """Interleaved 1F1B over `vpp` model chunks per rank (Megatron's virtual pipeline).

    Chunk v of rank p is virtual stage v * pp + p; activations travel round the ring of ranks V
    times. The microbatch count must be a multiple of pp (Megatron's requirement for its default
    microbatch group size of pp); warm-up forwards = 2 * (pp - rank - 1) + (V - 1) * pp.

    `overlap_p2p` (Megatron's overlap_p2p_comm, on by default there too): in the steady state the
    forward's transfers (send the output, receive the next input) are posted right after the forward
    and run under the backward, and the backward's under the next forward; each received buffer is
    waited for only when read. Every rank posts the same messages in the same order as the blocking
    exchange (forward direction, then backward), only earlier, so peers still pair them alike.
    """
    chunks = _chunks(model)
    if len(chunks) != state.config.vpp or len(chunks) < 2:
        raise ConfigError(
            f"the interleaved schedule needs one model chunk per virtual stage (vpp={state.config.vpp}, "
            f"at least 2), got {len(chunks)} chunks; build vpp chunks or use the 1F1B schedule."
        )
    if num_microbatches < state.pp or num_microbatches % state.pp:
        raise ConfigError(
            f"the interleaved pipeline schedule needs the number of microbatches ({num_microbatches}) to be "
            f"a positive multiple of the pipeline size pp={state.pp}, as Megatron requires; change the "
            "global batch or micro-batch size."
        )
    order = _VirtualOrder(state, num_microbatches, len(chunks), forward_only)
    device = p2p.default_device(state)
    flight = _InFlight(state, shape, dtype, device) if overlap_p2p and order.remaining else None
    # Per chunk, in microbatch order: inputs received (or None for data), outputs awaiting backward,
    # gradients received for those outputs.
    inputs: list[deque[torch.Tensor | None]] = [deque() for _ in chunks]
    outputs: list[deque[torch.Tensor]] = [deque() for _ in chunks]
    grads: list[deque[torch.Tensor]] = [deque() for _ in chunks]
    losses: list[torch.Tensor] = []

    def forward(k: int) -> torch.Tensor | None:
        """Forward of virtual step k; returns what to send to the next stage (None at the model's end)."""
        v = order.chunk(k, forward=True)
        if order.is_data_chunk(v):
            inputs[v].append(None)
        x = inputs[v][len(outputs[v])]  # the first input whose forward has not run yet
        if flight is not None:
            flight.ready(x)
        y = _run_forward(forward_step, order.microbatch(k), chunks[v], x, order.is_loss_chunk(v), losses, forward_only)
        if forward_only:
            inputs[v].popleft()
        else:
            outputs[v].append(y)
        return None if order.is_loss_chunk(v) else y

    def backward(k: int) -> torch.Tensor | None:
        """Backward of virtual step k; returns the gradient to send upstream (None at the model's start)."""
        v = order.chunk(k, forward=False)
        if flight is not None and not order.is_loss_chunk(v):
            flight.ready(grads[v][0])
        grad = None if order.is_loss_chunk(v) else grads[v].popleft()
        input_grad = _run_backward(inputs[v].popleft(), outputs[v].popleft(), grad)
        return None if order.is_data_chunk(v) else input_grad

    def comm(
        out: torch.Tensor | None, in_grad: torch.Tensor | None, recv_prev: bool, recv_next: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return p2p.send_forward_backward_recv_forward_backward(
            out, in_grad, recv_prev, recv_next, state, shape, dtype, device
        )

    if not order.is_data_chunk(0):
        inputs[0].append(p2p.communicate(state, recv_prev=True, shape=shape, dtype=dtype, device=device)[0])

    for k in range(order.warmup):
        recv_prev, v_in = order.receives(k, forward=True)
        recv_prev = recv_prev and k != order.total - 1
        # The last warm-up step also fetches the first output gradient (Megatron does the same).
        recv_next = k == order.warmup - 1 and not forward_only and not order.all_warmup and not state.is_last_stage
        out = forward(k)
        x, g = comm(out, None, recv_prev, recv_next)
        if not forward_only:
            _free_output(out)
        if recv_prev:
            inputs[v_in].append(x)
        if recv_next:
            grads[len(chunks) - 1].append(g)

    for i in range(order.remaining):  # steady state: forward of step warmup + i, backward of step i
        fk = order.warmup + i
        recv_prev, v_in = order.receives(fk, forward=True)
        recv_next, v_grad = order.receives(i, forward=False)
        recv_prev = recv_prev and i != order.remaining - 1
        out = forward(fk)
        if flight is not None:  # the forward's transfers run under this backward, the backward's under the next forward
            x = flight.post(send_next=out, recv_prev=recv_prev)[0]
            if recv_prev:
                inputs[v_in].append(x)
            g = flight.post(send_prev=backward(i), recv_next=recv_next)[1]
        else:
            x, g = comm(out, backward(i), recv_prev, recv_next)
            _free_output(out)
            if recv_prev:
                inputs[v_in].append(x)
        out = None  # drop the local reference: the output now lives only until its backward
        if recv_next:
            grads[v_grad].append(g)

    if not forward_only:
        if order.all_warmup and not order.is_loss_chunk(len(chunks) - 1):
            grads[len(chunks) - 1].append(comm(None, None, False, True)[1])
        for k in range(order.remaining, order.total):  # cool-down backwards
            recv_next, v_grad = order.receives(k, forward=False)
            recv_next = recv_next and k != order.total - 1
            g = comm(None, backward(k), False, recv_next)[1]
            if recv_next:
                grads[v_grad].append(g)
    if flight is not None:
        flight.drain()
    return losses


Schedule = Callable[..., list[torch.Tensor]]


def pick_schedule(state: ParallelState) -> Schedule:
    """Megatron's get_forward_backward_func: interleaved when pp > 1 and vpp > 1, 1F1B when pp > 1,
    otherwise no pipelining."""
    if state.pp > 1:
        if state.config.vpp > 1:
            return forward_backward_pipelining_with_interleaving
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining
