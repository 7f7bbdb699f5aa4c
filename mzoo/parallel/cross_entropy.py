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


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, true_vocab: int, group: Group):
        logits = logits.float()
        rows = logits.shape[-1]
        ids = torch.arange(vocab_start, vocab_start + rows, device=logits.device)
        logits = logits.masked_fill(ids >= true_vocab, float("-inf"))
        local_max = logits.max(dim=-1).values
        global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
        shifted = logits - global_max.unsqueeze(-1)
        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= rows)
        safe = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = _all_reduce(target_logit, dist.ReduceOp.SUM, group)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)
        loss = sum_exp.log() - target_logit
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), safe, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, safe, outside = ctx.saved_tensors
        grad = softmax
        one_hot = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, safe.unsqueeze(-1), -one_hot.unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, true_vocab: int, group: Group = None
) -> torch.Tensor:
    """Per-token loss [...]: logits [..., V_local] (this rank's vocabulary slice starting at
    `vocab_start`), target [...] global token ids."""
    return _VocabParallelCE.apply(logits, target, vocab_start, true_vocab, group)
