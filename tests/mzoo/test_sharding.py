"""ShardSpec splits and merges are inverse, and fused sections split per section."""

from __future__ import annotations

import pytest
import torch

from mzoo.parallel.sharding import ShardSpec


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize(
    "spec, shape",
    [
        (ShardSpec("tp", 0), (8, 3)),
        (ShardSpec("tp", 1), (3, 8)),
        (ShardSpec("tp", 0, sections=(8, 8)), (16, 3)),
        (ShardSpec("tp", 0, sections=(8, 4, 4, 4, 12)), (32, 2)),
        (ShardSpec(), (5, 5)),
    ],
)
def test_shard_merge_inverse(spec, shape, size):
    full = torch.arange(torch.Size(shape).numel()).reshape(shape).float()
    shards = [spec.shard(full, r, size) for r in range(size)]
    for s in shards:
        assert tuple(s.shape) == spec.local_shape(shape, size)
    assert torch.equal(spec.merge(shards), full)


def test_gated_sections_give_each_rank_its_gate_and_up_chunk():
    gate, up = torch.arange(8.0), torch.arange(100.0, 108.0)
    spec = ShardSpec("tp", 0, sections=(8, 8))
    rank1 = spec.shard(torch.cat([gate, up]), 1, 2)
    assert torch.equal(rank1, torch.cat([gate[4:], up[4:]]))  # not a chunk of [gate; up]
