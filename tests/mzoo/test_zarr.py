"""Megatron "zarr" backend: region-wise round trips, Megatron's on-disk layout, clear errors.

Layout facts below were confirmed in NVIDIA/Megatron-LM at commit 225a6e42673c (the parent of
"zarr soft deprecation", the last revision whose zarr strategy still saved and loaded):
- megatron/core/dist_checkpointing/strategies/zarr.py lines 170-177: zarr.create(global_shape,
  dtype, store=checkpoint_dir / key, chunks=sharded_tensor.max_allowed_chunks(), compressor=None,
  fill_value=None, write_empty_chunks=True); lines 190-193: bf16 .zarray dtype b"<V2" replaced
  by b"bfloat16"; line 157: bf16 data written as numpy bfloat16; line 336: keys are the direct
  sub-folders holding a .zarray, `.sync` folders skipped.
- megatron/core/dist_checkpointing/mapping.py line 236: max_allowed_chunks() = global shape //
  axis fragmentation per axis, i.e. one rank's shard (1 along a stacked layer axis).
- megatron/core/dist_checkpointing/strategies/tensorstore.py lines 143-146: the loader opens
  {"driver": "zarr", "metadata_key": ".zarray", "kvstore": {"driver": "file", "path": ...}}.
- megatron/core/dist_checkpointing/core.py lines 12, 90: metadata.json = json.dump of
  CheckpointingConfig(sharded_backend="zarr", 1, "torch", 1).
The exact .zarray bytes (no dimension_separator key, indent 4, sorted keys, no trailing newline)
are what zarr 2.18.7 wrote when driven the Megatron way; the test_real_zarr2_* tests recheck
that against real zarr 2 when it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import torch

from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.zarr import ZARR_METADATA, ZarrReader, ZarrWriter, is_zarr_checkpoint

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ZARR_DTYPE = {torch.float32: "<f4", torch.bfloat16: "bfloat16", torch.float16: "<f2"}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so comparisons are bit-exact (NaN payloads and -0.0 included)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    flat = t.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).to(dtype)  # specials, subnormal
    return t


def finish(folder: Path) -> None:
    """What the caller does after ZarrWriter.close(): metadata.json last."""
    (folder / "metadata.json").write_text(json.dumps(ZARR_METADATA))


def zarray_text(shape, chunks, dtype_str) -> str:
    """.zarray as zarr 2.x wrote it for Megatron's zarr.create(...) call."""
    ind = lambda xs: "[\n" + ",\n".join(f"        {x}" for x in xs) + "\n    ]" if xs else "[]"
    return (
        "{\n"
        f'    "chunks": {ind(chunks)},\n'
        '    "compressor": null,\n'
        f'    "dtype": "{dtype_str}",\n'
        '    "fill_value": null,\n'
        '    "filters": null,\n'
        '    "order": "C",\n'
        f'    "shape": {ind(shape)},\n'
        '    "zarr_format": 2\n'
        "}"
    )


def write_stacked(folder: Path, key: str, full: torch.Tensor, chunks=None) -> None:
    with ZarrWriter(folder) as w:
        w.create(key, tuple(full.shape), full.dtype, chunks)
        for layer in range(full.shape[0]):  # one leading index at a time: bounded memory
            w.write(key, (layer,), full[layer])
    finish(folder)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [(1, 6, 8), (1, 3, 8), None])
def test_round_trip_region_by_region(tmp_path, dtype, chunks):
    full = sample((4, 6, 8), dtype)
    write_stacked(tmp_path, "decoder.layers.mlp.linear_fc1.weight", full, chunks)
    r = ZarrReader(tmp_path)
    key = "decoder.layers.mlp.linear_fc1.weight"
    assert r.keys() == [key]
    assert r.shape(key) == (4, 6, 8) and r.dtype(key) == dtype
    back = r.read(key)
    assert back.dtype == dtype and back.shape == full.shape
    assert torch.equal(bits(back), bits(full))
    for index in [(2,), (slice(1, 3), slice(2, 5)), (-1, 4), (slice(None), 1, slice(0, 8, 3)), (0, 0, 0)]:
        got = r.read(key, index)
        assert got.shape == full[index].shape, index
        assert torch.equal(bits(got), bits(full[index])), index


def test_scalar_and_empty_arrays(tmp_path):
    with ZarrWriter(tmp_path) as w:
        w.create("s", (), torch.float32)
        w.write("s", (), torch.tensor(3.5))
        w.create("e", (0, 5), torch.bfloat16)
    finish(tmp_path)
    r = ZarrReader(tmp_path)
    assert r.read("s").shape == () and r.read("s").item() == 3.5
    assert r.read("e").shape == (0, 5) and r.dtype("e") == torch.bfloat16
    assert (tmp_path / "s" / "0").read_bytes() == np.float32(3.5).tobytes()


def test_reads_only_overlapping_chunks(tmp_path):
    full = sample((4, 6, 8), torch.bfloat16)
    write_stacked(tmp_path, "w", full, (1, 6, 8))
    (tmp_path / "w" / "3.0.0").unlink()  # a region that avoids layer 3 must not need it
    (tmp_path / "w" / "2.0.0").write_bytes(b"\0" * 10)  # truncated chunk
    r = ZarrReader(tmp_path)
    assert torch.equal(bits(r.read("w", (slice(0, 2),))), bits(full[:2]))
    with pytest.raises(CheckpointError, match="missing chunk 3.0.0"):
        r.read("w", (3,))
    with pytest.raises(CheckpointError, match="cannot be read.*damaged"):
        r.read("w", (2,))


def test_missing_key_and_damaged_array_errors(tmp_path):
    write_stacked(tmp_path, "w", sample((2, 3, 4), torch.float32), (1, 3, 4))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".zarray").write_text("{not json")
    (tmp_path / "w.sync").mkdir()  # zarr's lock folder: never a key
    r = ZarrReader(tmp_path)
    assert r.keys() == ["bad", "w"]
    with pytest.raises(CheckpointError, match=r"has no array 'nope'"):
        r.read("nope")
    with pytest.raises(CheckpointError, match=r"has no array 'w.sync'"):
        r.shape("w.sync")
    with pytest.raises(CheckpointError, match=r"array 'bad' .* cannot be opened .* damaged"):
        r.dtype("bad")
    with pytest.raises(IndexError):
        r.read("w", (2,))


def test_checkpoint_detection_and_reader_preconditions(tmp_path):
    assert not is_zarr_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no metadata.json"):
        ZarrReader(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({**ZARR_METADATA, "sharded_backend": "torch_dist"}))
    assert not is_zarr_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="'torch_dist' backend"):
        ZarrReader(tmp_path)
    finish(tmp_path)
    assert is_zarr_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        ZarrReader(tmp_path / "metadata.json")


def test_writer_refuses_mistakes(tmp_path):
    w = ZarrWriter(tmp_path)
    w.create("w", (2, 4), torch.bfloat16, (1, 4))
    with pytest.raises(CheckpointError, match="already exists"):
        w.create("w", (2, 4), torch.bfloat16)
    with pytest.raises(TypeError, match="holds torch.bfloat16"):
        w.write("w", (0,), torch.zeros(4))
    with pytest.raises(ValueError, match="does not match"):
        w.write("w", (slice(0, 2),), torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(KeyError):
        w.write("x", (0,), torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        w.create("a/b", (1,), torch.float32)
    w.write("w", (0,), torch.zeros(4, dtype=torch.bfloat16))  # zeros are still stored (write_empty_chunks)
    assert (tmp_path / "w" / "0.0").is_file()
    with pytest.raises(CheckpointError, match="1 of 2 chunks never written .first: 1.0"):
        w.close()
    w.write("w", (1,), torch.ones(4, dtype=torch.bfloat16))
    w.close()
    assert not (tmp_path / "metadata.json").exists()  # the caller writes it, last


@pytest.mark.parametrize("dtype", DTYPES)
def test_zarray_is_what_megatron_wrote(tmp_path, dtype):
    write_stacked(tmp_path, "w", sample((4, 6, 8), dtype), (1, 3, 8))
    raw = (tmp_path / "w" / ".zarray").read_text()
    meta = json.loads(raw)
    # strategies/zarr.py 170-193: compressor None, fill_value None, chunks = shard, bf16 "bfloat16"
    assert meta == {
        "chunks": [1, 3, 8], "compressor": None, "dtype": ZARR_DTYPE[dtype], "fill_value": None,
        "filters": None, "order": "C", "shape": [4, 6, 8], "zarr_format": 2,
    }
    assert raw == zarray_text((4, 6, 8), (1, 3, 8), ZARR_DTYPE[dtype])
    # write_empty_chunks=True: every chunk is a file, "." separated, raw little-endian C-order bytes
    names = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert names == [".zarray"] + [f"{l}.{t}.0" for l in range(4) for t in range(2)]
    assert (tmp_path / "w" / "1.1.0").stat().st_size == 3 * 8 * torch.finfo(dtype).bits // 8
    assert not (tmp_path / "w" / ".zattrs").exists()


def megatron_fixture(folder: Path, key: str, full: torch.Tensor, chunks: tuple[int, ...]) -> None:
    """The bytes Megatron's zarr strategy left on disk: its .zarray and one raw chunk per rank shard."""
    arr = folder / key
    arr.mkdir(parents=True)
    (arr / ".zarray").write_text(zarray_text(tuple(full.shape), chunks, ZARR_DTYPE[full.dtype]))
    grid = [range(n // c) for n, c in zip(full.shape, chunks)]
    for pos in np.ndindex(*[len(g) for g in grid]):
        shard = full[tuple(slice(p * c, (p + 1) * c) for p, c in zip(pos, chunks))].contiguous()
        raw = bits(shard).numpy().astype(f"<i{shard.element_size()}").tobytes()  # C order, little-endian
        (arr / ".".join(map(str, pos))).write_bytes(raw)
    (folder / "metadata.json").write_text(json.dumps(ZARR_METADATA))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_a_checkpoint_laid_out_the_megatron_way(tmp_path, dtype):
    # TP=2 over dim 1 of a 4-layer stack: max_allowed_chunks() = (4//4, 6//2, 8//1)
    full = sample((4, 6, 8), dtype, seed=1)
    megatron_fixture(tmp_path, "decoder.layers.self_attention.linear_qkv.weight", full, (1, 3, 8))
    r = ZarrReader(tmp_path)
    key = "decoder.layers.self_attention.linear_qkv.weight"
    assert r.dtype(key) == dtype and r.shape(key) == (4, 6, 8)
    assert torch.equal(bits(r.read(key)), bits(full))
    assert torch.equal(bits(r.read(key, (1, slice(2, 5)))), bits(full[1, 2:5]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_megatron_tensorstore_loader_reads_our_output(tmp_path, dtype):
    full = sample((4, 6, 8), dtype, seed=2)
    write_stacked(tmp_path, "w", full, (1, 3, 8))
    # strategies/tensorstore.py 143-146 (open_ts_array), then postprocess_numpy_array (zarr.py 259-261)
    kvstore = {"driver": "file", "path": str(tmp_path / "w")}
    spec = {"driver": "zarr", "metadata_key": ".zarray", "kvstore": kvstore}
    arr = ts.open(ts.Spec(spec), open=True).result()
    x = arr[1:3, 3:6].read().result()
    if x.dtype == np.dtype(ts.bfloat16.numpy_dtype):
        got = torch.from_numpy(x.astype(np.float32)).bfloat16()
    else:
        got = torch.from_numpy(x)
    want = full[1:3, 3:6]
    assert got.dtype == dtype
    assert torch.equal(got.float().nan_to_num(0.0), want.float().nan_to_num(0.0))
    assert torch.equal(got.isnan(), want.isnan())


def _real_zarr2():
    zarr = pytest.importorskip("zarr")
    if not zarr.__version__.startswith("2."):
        pytest.skip("Megatron wrote with zarr 2.x")
    return zarr


def test_real_zarr2_megatron_writer_is_read_and_matches_ours(tmp_path):
    """Only where zarr 2 is installed: drive it exactly as Megatron did and compare bytes with ours."""
    zarr = _real_zarr2()
    full = sample((4, 6, 8), torch.bfloat16, seed=3)
    full.view(-1)[0] = 0.5  # Megatron's bf16 -> f32 -> bf16 trip canonicalizes NaN payloads
    meg, ours = tmp_path / "meg", tmp_path / "ours"
    meg.mkdir()
    bf16 = np.dtype(ts.bfloat16.numpy_dtype)
    arr = zarr.create((4, 6, 8), dtype=bf16, store=meg / "w", chunks=(1, 3, 8), compressor=None,
                      fill_value=None, write_empty_chunks=True)
    arr._dtype = bf16
    arr.store[".zarray"] = arr.store[".zarray"].replace(b"<V2", b"bfloat16")
    for layer in range(4):
        for t in range(2):
            shard = full[layer, t * 3:(t + 1) * 3].float().numpy().astype(bf16)
            zarr.open(str(meg / "w"), "r+")[layer, t * 3:(t + 1) * 3] = shard
    finish(meg)
    assert torch.equal(bits(ZarrReader(meg).read("w")), bits(full))
    write_stacked(ours, "w", full, (1, 3, 8))
    for f in sorted((meg / "w").iterdir()):
        assert (ours / "w" / f.name).read_bytes() == f.read_bytes(), f.name
    back = zarr.open(str(ours / "w"), "r")[:]
    assert torch.equal(torch.from_numpy(back.view(np.int16)), bits(full))


def test_write_checkpoint_from_chunks_and_read_as_checkpoint(tmp_path):
    """The converter pipeline's entry points: dist.Chunk pieces in, ZarrCheckpoint (with common) out."""
    import argparse

    from mzoo.ckpt.dist import Chunk
    from mzoo.ckpt.zarr import ZarrCheckpoint, write_checkpoint

    stack = sample((3, 4, 2), torch.bfloat16, seed=4)
    emb = sample((5, 2), torch.bfloat16, seed=5)
    chunks = [Chunk("decoder.layers.w", (3, 4, 2), (i, 0, 0), (1, 4, 2), torch.bfloat16,
                    lambda i=i: stack[i].unsqueeze(0)) for i in range(3)]
    emb_key = "embedding.word_embeddings.weight"
    chunks.append(Chunk(emb_key, (5, 2), (0, 0), (5, 2), torch.bfloat16, lambda: emb))
    seen: list[int] = []
    common = {"args": argparse.Namespace(num_layers=3), "iteration": 7}
    write_checkpoint(tmp_path, chunks, common, seen.append)
    assert seen == [16, 16, 16, 20]
    assert json.loads((tmp_path / "metadata.json").read_text()) == ZARR_METADATA
    assert is_zarr_checkpoint(tmp_path)
    assert json.loads((tmp_path / "decoder.layers.w" / ".zarray").read_text())["chunks"] == [1, 4, 2]
    ck = ZarrCheckpoint(tmp_path)
    assert ck.common["iteration"] == 7 and ck.common["args"].num_layers == 3
    assert ck.keys() == ["decoder.layers.w", emb_key]
    assert torch.equal(bits(ck.read("decoder.layers.w", 1)), bits(stack[1]))  # DistReader-style layer row
    assert torch.equal(bits(ck.read(emb_key, None)), bits(emb))


def test_write_checkpoint_saves_sharded_objects_the_megatron_way(tmp_path):
    """Each ShardedObject is torch.save(data) in `<unique key>.pt`, what megatron's common strategy
    (strategies/common.py save_sharded_objects) wrote beside the zarr arrays; the reader skips them."""
    from mzoo.ckpt.dist import Chunk
    from mzoo.ckpt.zarr import ZarrCheckpoint, save_object, write_checkpoint

    key = "decoder.layers.self_attention.linear_proj.weight"
    stack = sample((2, 4, 4), torch.bfloat16, seed=6)
    chunks = [Chunk(key, (2, 4, 4), (i, 0, 0), (1, 4, 4), torch.bfloat16, lambda i=i: stack[i].unsqueeze(0),
                    prepend=1) for i in range(2)]
    norm = torch.rand(4).bfloat16()
    chunks.append(Chunk("decoder.final_layernorm.weight", (4,), (0,), (4,), torch.bfloat16, lambda: norm))
    write_checkpoint(tmp_path, chunks, {"iteration": 0}, objects={"output_layer._extra_state/shard_0_1": None})
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*.pt"))
    assert files == ["decoder.layers.self_attention.linear_proj._extra_state/shard_0_2.pt",
                     "decoder.layers.self_attention.linear_proj._extra_state/shard_1_2.pt",
                     "output_layer._extra_state/shard_0_1.pt"]  # no object for a norm
    (tmp_path / "ref").mkdir()
    torch.save(None, tmp_path / "ref" / "shard_0_2.pt")  # the bytes depend on the file name only
    assert (tmp_path / files[0]).read_bytes() == (tmp_path / "ref" / "shard_0_2.pt").read_bytes()
    assert all(torch.load(tmp_path / f) is None for f in files)
    ck = ZarrCheckpoint(tmp_path)
    assert ck.keys() == ["decoder.final_layernorm.weight", key]
    assert torch.equal(bits(ck.read(key)), bits(stack))
    for bad in ("no-slash", "a/b/shard_0_1", "../shard_0_1", "x._extra_state/0_1"):
        with pytest.raises(ValueError, match="is not a ShardedObject key"):
            save_object(tmp_path, bad, None)
