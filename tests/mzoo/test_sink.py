"""The output path under every writer: FileSink (writer thread, CRC on the way out, kernel copies
of extents), torch.save archives written record by record, and DCP metadata written without DCP."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib

import pytest
import torch

import mzoo.ckpt.sink as sink_mod
import mzoo.ckpt.torch_zip as torch_zip
from mzoo.ckpt import dcp_meta
from mzoo.ckpt.sidecar import crc32_file
from mzoo.ckpt.sink import (Budget, Extent, FileSink, TensorExtents, cat_rows, crc32_combine, extents_crc,
                            known_crc)
from mzoo.errors import UserError
from mzoo.layout import Layout


@pytest.mark.parametrize("split", [0, 1, 7, 4096, 99_999, 100_000])
def test_crc32_combine_equals_one_pass(split):
    data = os.urandom(100_000)
    a, b = data[:split], data[split:]
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


def _source(tmp_path, n=1 << 16):
    path = tmp_path / "src.bin"
    data = os.urandom(n)
    path.write_bytes(data)
    return path, data


def test_sink_writes_pieces_in_order_and_knows_the_file_crc(tmp_path):
    src, data = _source(tmp_path)
    out = tmp_path / "out.bin"
    s = FileSink(out)
    s.write(b"head")
    t = torch.arange(1000, dtype=torch.int32)
    s.write_tensor(t)
    piece = s.copy([Extent(src, 100, 5000), Extent(None, 0, 3000), Extent(src, 0, 10)])
    s.write_deferred(4, lambda: piece.crc.to_bytes(4, "little"))
    assert s.position == 4 + 4000 + 8010 + 4
    s.wait()
    expected = b"head" + t.numpy().tobytes() + data[100:5100] + bytes(3000) + data[:10]
    expected += zlib.crc32(data[100:5100] + bytes(3000) + data[:10]).to_bytes(4, "little")
    assert out.read_bytes() == expected
    assert known_crc(out) == zlib.crc32(expected) == int(crc32_file(out), 16)
    out.write_bytes(b"changed")  # a changed file is not vouched for by the writer's CRC
    assert known_crc(out) is None


@pytest.mark.parametrize("how", ["copy_file_range", "sendfile", "write"])
def test_every_kernel_copy_fallback_gives_the_same_bytes(tmp_path, monkeypatch, how):
    src, data = _source(tmp_path, 3 << 20)
    monkeypatch.setattr(sink_mod, "_KERNEL_COPY", how)
    monkeypatch.setattr(sink_mod, "_MAX_WRITE", 1 << 20)  # several calls per extent
    out = tmp_path / "out.bin"
    s = FileSink(out)
    s.copy([Extent(src, 12345, (2 << 20) + 7)])
    s.wait()
    assert out.read_bytes() == data[12345 : 12345 + (2 << 20) + 7]


def test_truncated_source_fails_in_one_sentence_before_writing(tmp_path):
    src, _ = _source(tmp_path, 1000)
    s = FileSink(tmp_path / "out.bin")
    with pytest.raises(UserError, match=r"is truncated \(it ends before byte 2000\); re-download or re-convert it"):
        s.copy([Extent(src, 500, 1500)])
    s.abort()


def test_a_writer_thread_error_reaches_the_producer_and_frees_the_budget(tmp_path):
    budget = Budget(limit=1 << 20)
    s = FileSink(tmp_path / "out.bin", budget)
    s.write_deferred(3, lambda: b"too long")  # promises 3 bytes, makes 8: the writer thread fails
    with pytest.raises(RuntimeError, match="promised"):
        s.wait()
    assert budget.pending == 0 and budget.copies == 0
    other = FileSink(tmp_path / "other.bin", budget)  # a sink sharing the budget is not blocked
    other.write(bytes(2 << 20))
    other.wait()
    assert (tmp_path / "other.bin").stat().st_size == 2 << 20


def _watch(monkeypatch, method: str, read) -> list[int]:
    """What `read()` returns each time the writer thread enters FileSink.<method>."""
    seen, original = [], getattr(FileSink, method)

    def watched(self, *args):
        seen.append(read())
        return original(self, *args)

    monkeypatch.setattr(FileSink, method, watched)
    return seen


def test_budget_bounds_queued_bytes(tmp_path, monkeypatch):
    """A producer waits while queued buffers exceed the budget (but a big one still goes alone)."""
    budget = Budget(limit=1 << 20)
    s = FileSink(tmp_path / "out.bin", budget)
    seen = _watch(monkeypatch, "_write_piece", lambda: budget.pending)
    for _ in range(8):
        s.write(bytes(3 << 20))
    s.wait()
    assert max(seen) <= 3 << 20  # never more than one 3 MB buffer queued at once
    assert (tmp_path / "out.bin").stat().st_size == 24 << 20


def test_budget_bounds_queued_copies(tmp_path, monkeypatch):
    src, data = _source(tmp_path, 1 << 20)
    budget = Budget(copy_limit=1 << 20)
    s = FileSink(tmp_path / "out.bin", budget)
    seen = _watch(monkeypatch, "_copy", lambda: budget.copies)
    for _ in range(8):
        s.copy([Extent(src, 0, 600_000)])
    s.wait()
    assert max(seen) <= 600_000 and budget.copies == 0
    assert (tmp_path / "out.bin").read_bytes() == data[:600_000] * 8


def test_tensor_extents_rows_and_cat_cross_extent_boundaries():
    a = TensorExtents((4, 2), torch.float32, (Extent(None, 0, 16), Extent(None, 0, 16)))
    assert a.rows(1, 2).extents == (Extent(None, 0, 8), Extent(None, 0, 8))
    with pytest.raises(ValueError):
        a.rows(3, 2)
    with pytest.raises(ValueError):
        cat_rows([a, TensorExtents((1, 3), torch.float32, (Extent(None, 0, 12),))])
    assert extents_crc(list(a.rows(0, 4).extents)) == zlib.crc32(bytes(32))


VALUES = [torch.randn(5, 7).to(torch.bfloat16), torch.arange(1000, dtype=torch.int64), torch.zeros(0),
          torch.tensor(3.5), torch.randn(3, 4, 5)[:, 1], torch.randn(2, 3).to(torch.float16)]


@pytest.mark.parametrize("zip64", [False, True])
def test_saved_tensors_load_in_torch_and_are_valid_zips(tmp_path, monkeypatch, zip64):
    if zip64:  # every record takes the zip64 path (real ones need > 4 GiB)
        monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 100)
    s = FileSink(tmp_path / "items.bin")
    s.write(b"something before the first archive")
    spans = [torch_zip.save_tensor(s, v) for v in VALUES]
    s.wait()
    raw = (tmp_path / "items.bin").read_bytes()
    for (offset, length), v in zip(spans, VALUES):
        blob = raw[offset : offset + length]
        assert torch.equal(torch.load(io.BytesIO(blob), weights_only=True), v.contiguous())
        assert zipfile.ZipFile(io.BytesIO(blob)).testzip() is None  # every record's CRC checks
        one = tmp_path / "one.pt"
        one.write_bytes(blob)
        assert torch.equal(torch.load(one, weights_only=True, mmap=True), v.contiguous())  # 64-byte aligned


@pytest.mark.parametrize("zip64", [False, True])
def test_incremental_writer_makes_a_torch_save_file(tmp_path, monkeypatch, zip64):
    if zip64:
        monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 100)
    src = tmp_path / "src.bin"
    src.write_bytes(VALUES[1].numpy().tobytes())
    w = torch_zip.IncrementalTorchWriter(tmp_path / "model_optim_rng.pt")
    state = {"model": {"a": w.tensor(VALUES[0]),
                       "b": w.tensor(TensorExtents((10, 100), torch.int64, (Extent(src, 0, 8000),))),
                       "c": w.tensor(VALUES[2])},
             "iteration": 3, "args": {"x": [1.5]}}
    w.finish(state)
    w.wait()
    for mmap in (False, True):
        got = torch.load(tmp_path / "model_optim_rng.pt", weights_only=True, mmap=mmap)
        assert torch.equal(got["model"]["a"], VALUES[0])
        assert torch.equal(got["model"]["b"], VALUES[1].reshape(10, 100))
        assert got["iteration"] == 3 and got["args"] == {"x": [1.5]}
    assert zipfile.ZipFile(tmp_path / "model_optim_rng.pt").testzip() is None


def _metadata(m, storage_info):
    return m.Metadata(
        state_dict_metadata={
            "w": m.TensorStorageMetadata(m.TensorProperties(dtype=torch.bfloat16), torch.Size([4, 3]),
                                         [m.ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
                                          m.ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 3]))]),
            "o/shard_0_1": m.BytesStorageMetadata()},
        planner_data={},
        storage_data={m.MetadataIndex("w", torch.Size([0, 0]), 0): storage_info("__0_0.distcp", 0, 10),
                      m.MetadataIndex("w", torch.Size([2, 0]), 1): storage_info("__0_1.distcp", 0, 10),
                      m.MetadataIndex("o/shard_0_1"): storage_info("__0_0.distcp", 10, 5)},
        storage_meta=m.StorageMeta(save_id="abc"), version="1.0.0")


def test_dcp_metadata_mirrors_pickle_byte_for_byte_like_dcp():
    from torch.distributed.checkpoint import metadata as real
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    ours = dcp_meta.dumps(_metadata(dcp_meta, dcp_meta._StorageInfo))
    assert ours == pickle.dumps(_metadata(real, _StorageInfo))
    assert pickle.loads(ours) == _metadata(real, _StorageInfo)  # DCP reads it as its own


def test_torch_dcp_reader_loads_what_mzoo_writes(tmp_path):
    """torch's own FileSystemReader (what megatron-core uses underneath) reads mzoo's torch_dist
    output, including tensors copied from the source by the kernel."""
    import torch.distributed.checkpoint as dcp
    from transformers import LlamaConfig

    from conftest import make_hf_model
    from mzoo.ckpt.dist import DistReader
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
    from mzoo.ckpt.megatron.checkpoint import Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    src = make_hf_model(tmp_path / "hf", LlamaConfig(vocab_size=999, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=8, num_key_value_heads=4,
                                                     intermediate_size=96))
    convert(open_source(src), tmp_path / "m", Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2))))
    folder = tmp_path / "m" / "release"
    ours = DistReader(folder)
    state = {k: torch.empty(ours.shape(k), dtype=ours.dtype(k)) for k in ours.keys()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    for key, value in state.items():
        assert torch.equal(value, ours.read(key)), key
    assert dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata.keys() == \
        ours.metadata.state_dict_metadata.keys()
