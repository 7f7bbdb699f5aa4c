"""Cross entropy over vocabulary-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for its slice of the (padded) vocabulary. As in Megatron, the max, the
target logit and the sum of exponentials are all-reduced over the TP group. Unlike Megatron, the
padding rows (ids >= the true vocabulary size) are excluded from the softmax, so the loss is
independent of the padding and equals transformers' loss on the same weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def _all_reduce(x: torch.Tensor, op, group: Group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


CHUNK_ELEMENTS = 1 << 24  # fp32 working set per chunk of rows (64 MB): no fp32 copy of the whole slice


def _row_chunks(logits: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) row ranges of the flattened [tokens, vocab slice] logits, CHUNK_ELEMENTS each."""
    rows, width = logits.shape[0], max(1, logits.shape[1])
    step = max(1, CHUNK_ELEMENTS // width)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _masked(chunk: torch.Tensor, vocab_start: int, true_vocab: int) -> torch.Tensor:
    """A fresh fp32 copy of the chunk (callers work on it in place) with the padding rows of the
    vocabulary (ids >= true_vocab) at -inf."""
    out = chunk.to(torch.float32, copy=True)
    first_pad = true_vocab - vocab_start
    if first_pad < out.shape[-1]:
        out[:, max(0, first_pad):] = float("-inf")
    return out


class _VocabParallelCE(torch.autograd.Function):
    """Megatron's vocab-parallel cross entropy, keeping only the logits (in their own dtype) and
    per-token fp32 statistics for backward: the softmax is recomputed chunk by chunk and the
    gradient written into the logits' own storage (they are dead after the loss), so the loss costs
    no fp32 tensor of the whole [tokens, vocab / tp] slice (Megatron's fused cross entropy does the
    same in one kernel)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, true_vocab: int, group: Group):
        shape = target.shape
        flat, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        rows = flat.shape[1]
        chunks = _row_chunks(flat)
        local_max = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        for a, b in chunks:
            local_max[a:b] = _masked(flat[a:b], vocab_start, true_vocab).max(dim=-1).values
        global_max = _all_reduce(local_max, dist.ReduceOp.MAX, group)
        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= rows)
        safe = local_target.masked_fill(outside, 0)
        target_logit = torch.empty_like(global_max)
        sum_exp = torch.empty_like(global_max)
        for a, b in chunks:
            shifted = _masked(flat[a:b], vocab_start, true_vocab).sub_(global_max[a:b].unsqueeze(-1))
            target_logit[a:b] = shifted.gather(-1, safe[a:b].unsqueeze(-1)).squeeze(-1)
            sum_exp[a:b] = shifted.exp_().sum(dim=-1)
        target_logit = _all_reduce(target_logit.masked_fill_(outside, 0.0), dist.ReduceOp.SUM, group)
        sum_exp = _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(flat, global_max, sum_exp, safe, outside)
        ctx.vocab, ctx.shape = (vocab_start, true_vocab), logits.shape
        return (sum_exp.log() - target_logit).view(shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        flat, global_max, sum_exp, safe, outside = ctx.saved_tensors
        vocab_start, true_vocab = ctx.vocab
        grad_loss = grad_loss.reshape(-1)
        one_hot = (~outside).float()
        for a, b in _row_chunks(flat):
            softmax = _masked(flat[a:b], vocab_start, true_vocab).sub_(global_max[a:b].unsqueeze(-1)).exp_()
            softmax.div_(sum_exp[a:b].unsqueeze(-1))
            softmax.scatter_add_(-1, safe[a:b].unsqueeze(-1), -one_hot[a:b].unsqueeze(-1))
            flat[a:b].copy_(softmax.mul_(grad_loss[a:b].unsqueeze(-1)))  # in place: the logits are dead
        return flat.view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, true_vocab: int, group: Group = None
) -> torch.Tensor:
    """Per-token loss [...]: logits [..., V_local] (this rank's vocabulary slice starting at
    `vocab_start`), target [...] global token ids."""
    return _VocabParallelCE.apply(logits, target, vocab_start, true_vocab, group)
