"""Which global samples a data-parallel rank trains on (Megatron-LM's MegatronPretrainingSampler)."""

from __future__ import annotations

from mzoo.data.errors import DataError

def global_sample_indices(consumed_samples: int, global_batch: int, dp_rank: int, dp_size: int,
                          micro_batch: int) -> list[list[int]]:
    """The micro-batches (global sample indices) DP rank `dp_rank` trains on in the global batch that
    starts at `consumed_samples`, as Megatron-LM's MegatronPretrainingSampler assigns them: each
    micro-step takes the next micro_batch * dp_size samples and rank r the r-th slice of them.

    The union over ranks and micro-steps is always [consumed, consumed + global_batch), so the data
    depends only on the consumed-samples counter: a resumed run continues where it stopped, at any
    DP size."""
    per_step = micro_batch * dp_size
    if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"invalid data-parallel rank {dp_rank} of {dp_size} with micro batch {micro_batch}.")
    if global_batch % per_step:
        raise DataError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x data "
                        f"parallel {dp_size}; change one of them.")
    out = []
    for m in range(global_batch // per_step):
        start = consumed_samples + m * per_step + dp_rank * micro_batch
        out.append(list(range(start, start + micro_batch)))
    return out
