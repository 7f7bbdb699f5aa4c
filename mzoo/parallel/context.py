"""Context parallelism (CP), Megatron-Core's: each CP rank holds 2 of the sequence's 2 * cp chunks and
the attention over the whole sequence is exact.

- Load balance (Megatron's get_batch_on_this_cp_rank): the sequence is cut into 2 * cp equal chunks
  and rank r keeps chunks r and 2 * cp - 1 - r, so every rank does the same causal work. Every CP
  rank reads the same micro-batch and keeps its two chunks of tokens, labels, loss mask, positions
  and segment ids; activations are [seq / cp, batch, hidden] from the embedding to the loss.
- Attention: keys and values are all-gathered over the CP group (backward: reduce-scatter of their
  gradients), Megatron's cp_comm_type "all_gather", then every local query attends to them
  tile by tile (mzoo/parallel/blockwise.py), causally by global sequence index. An all-gather is
  one collective per layer, deterministic and exact, and with grouped-query attention the gathered
  K/V (2 * kv_heads * head_dim per token) are a fraction of one hidden state; a ring (p2p) exchange
  only pays off when its transfers overlap the tile computations, which needs GPU streams.
- Positions are the tokens' global positions (RoPE and learned embeddings see them); packed
  sequences' segment ids are all-gathered once per forward so each key tile knows its segments.
- Loss: each rank's token mean is cp times its share of the micro-batch loss, so gradients summed
  over the data x context parallel group and divided by dp * cp are the one-process gradients
  (Megatron's data_parallel_group with context parallel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mzoo.parallel import collectives as C
from mzoo.parallel.blockwise import blockwise_attention
from mzoo.parallel.state import ParallelState


def chunk_indices(seq_len: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global sequence indices this CP rank holds: chunks cp_rank and 2 * cp - 1 - cp_rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def gathered_indices(seq_len: int, cp: int, device=None) -> torch.Tensor:
    """Global indices of an all-gather over the CP group: every rank's chunks, in rank order."""
    return torch.cat([chunk_indices(seq_len, cp, r, device) for r in range(cp)])


def split_for_rank(batch: dict[str, torch.Tensor], state: ParallelState) -> dict[str, torch.Tensor]:
    """This CP rank's two chunks of every [b, s] tensor of a micro-batch (without packed positions
    the model gives the chunks their global positions itself, on every pipeline stage)."""
    cp = state.config.cp
    if cp == 1 or not batch:
        return batch
    first = next(iter(batch.values()))
    index = chunk_indices(first.shape[1], cp, state.cp_rank, first.device)
    return {key: t.index_select(1, index) for key, t in batch.items()}


@dataclass
class ContextParallelAttention:
    """What attention needs to know about this rank's chunks; passed down the layers in place of a mask."""

    q_index: torch.Tensor  # [s_local] global sequence index of each local query
    k_index: torch.Tensor  # [s] of each all-gathered key
    q_segments: Optional[torch.Tensor]  # [b, s_local] packed-sequence ids, or None
    k_segments: Optional[torch.Tensor]  # [b, s] in the all-gathered order
    state: ParallelState

    @classmethod
    def build(cls, state: ParallelState, local_len: int, device, segments: Optional[torch.Tensor] = None
              ) -> "ContextParallelAttention":
        cp, seq = state.config.cp, local_len * state.config.cp
        k_segments = None
        if segments is not None:  # [b, s_local] -> [b, s] gathered (no gradient: integer ids)
            k_segments = C._gather_first(segments.t(), state.cp_group).t()
        return cls(chunk_indices(seq, cp, state.cp_rank, device), gathered_indices(seq, cp, device),
                   segments, k_segments, state)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                 sinks: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
        """q [b, hq, s_local, d], k / v [b, hk, s_local, d]: attention over the whole sequence (with
        GPT-OSS's per-head `sinks` and sliding `window` where given)."""
        group = self.state.cp_group
        k, v = (C.gather_from_sp(t.permute(2, 0, 1, 3), group).permute(1, 2, 0, 3) for t in (k, v))
        return blockwise_attention(q, k, v, self.q_index, self.k_index, self.q_segments, self.k_segments, scale,
                                   sinks=sinks, window=window)
