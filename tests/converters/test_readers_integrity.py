"""Issue 17 case 12: every reader verifies the checksums a checkpoint records before it uses a
file: mzoo.yaml's per-file CRC-32, else the torch archive's own per-record CRC-32 (Megatron-LM's
checkpoints), and a .distcp item that does not fit its file. One sentence naming the file, never
torch's `weights_only=False` advice."""

from __future__ import annotations

import shutil

import pytest
from conftest import make_hf_model
from transformers import LlamaConfig

from mzoo.ckpt.hf import CheckpointError
from mzoo.layout import Layout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = tmp_path_factory.mktemp("integrity")
    hf = make_hf_model(root / "hf-src", LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2))
    out = {"hf-src": hf}
    for fmt in ("torch_dist", "torch", "zarr"):
        out[fmt] = root / fmt
        convert(open_source(hf), out[fmt], Target(fmt, MegatronCheckpoint(layout=Layout(tp=2))))
    out["hf"] = root / "hf"
    convert(open_source(out["torch_dist"]), out["hf"], Target("hf"))
    return out


def _data_files(folder):
    suffixes = {".safetensors", ".distcp", ".pt"}
    return sorted((p for p in folder.rglob("*") if p.is_file() and (p.suffix in suffixes or p.parent.name.startswith("decoder")
                   or p.parent.parent.name.startswith("decoder"))), key=lambda p: -p.stat().st_size)


def _flip(path, where=2 / 3):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def _read_all(path):
    from mzoo.jobs.sources import open_source

    src = open_source(path)
    for t in src.tensors:
        src.get(t.name)
        if src.extents is not None:
            src.extents(t.name)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch", "hf", "zarr"])
def test_intact_checkpoints_read(checkpoints, fmt):
    _read_all(checkpoints[fmt])


@pytest.mark.parametrize("fmt", ["torch_dist", "torch", "hf"])
def test_flipped_byte_with_sidecar_is_named(checkpoints, fmt, tmp_path):
    copy = tmp_path / fmt
    shutil.copytree(checkpoints[fmt], copy)
    victim = _data_files(copy)[0]
    _flip(victim)
    with pytest.raises(CheckpointError, match="CRC-32") as e:
        _read_all(copy)
    assert victim.name in str(e.value) and "weights_only" not in str(e.value)


def test_flipped_zarr_chunk_with_sidecar_is_named(checkpoints, tmp_path):
    copy = tmp_path / "zarr"
    shutil.copytree(checkpoints["zarr"], copy)
    chunks = sorted((p for p in copy.rglob("*") if p.is_file() and p.parent.name.startswith("decoder")
                     and not p.name.startswith(".")), key=lambda p: -p.stat().st_size)
    _flip(chunks[0], 0.5)
    with pytest.raises(CheckpointError, match="CRC-32") as e:
        _read_all(copy)
    assert chunks[0].name in str(e.value)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_flipped_byte_without_sidecar_uses_the_archive_crc(checkpoints, fmt, tmp_path):
    """Megatron-LM's own checkpoints carry no mzoo.yaml: the torch archive's CRC-32s catch it."""
    copy = tmp_path / fmt
    shutil.copytree(checkpoints[fmt], copy)
    (copy / "mzoo.yaml").unlink()
    victim = _data_files(copy)[0]
    _flip(victim)
    with pytest.raises(CheckpointError, match="CRC-32") as e:
        _read_all(copy)
    assert victim.name in str(e.value) and "weights_only" not in str(e.value)


def test_half_truncated_distcp_without_sidecar_fails_at_open(checkpoints, tmp_path):
    from mzoo.jobs.sources import open_source

    copy = tmp_path / "torch_dist"
    shutil.copytree(checkpoints["torch_dist"], copy)
    (copy / "mzoo.yaml").unlink()
    victim = _data_files(copy)[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_source(copy)
    assert victim.name in str(e.value)


def test_tp_rank_from_another_model_is_named(checkpoints, tmp_path):
    """A rank file swapped in from another model of the same shape: mzoo.yaml's CRC-32 names it."""
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    other_hf = make_hf_model(tmp_path / "other-hf", LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=2, num_attention_heads=4,
                                                                num_key_value_heads=2), seed=7)
    other = tmp_path / "other"
    convert(open_source(other_hf), other, Target("torch", MegatronCheckpoint(layout=Layout(tp=2))))
    copy = tmp_path / "torch"
    shutil.copytree(checkpoints["torch"], copy)
    rank1 = next(copy.rglob("mp_rank_01/model_optim_rng.pt"))
    shutil.copy(next(other.rglob("mp_rank_01/model_optim_rng.pt")), rank1)
    with pytest.raises(CheckpointError, match="CRC-32") as e:
        _read_all(copy)
    assert "mp_rank_01" in str(e.value)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_inspect_check_without_sidecar_uses_the_archive_crc(checkpoints, fmt, tmp_path):
    import json

    from typer.testing import CliRunner

    from mzoo.cli.main import app

    copy = tmp_path / fmt
    shutil.copytree(checkpoints[fmt], copy)
    (copy / "mzoo.yaml").unlink()
    ok = CliRunner().invoke(app, ["inspect", str(copy), "--check", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["problems"] == []
    victim = _data_files(copy)[0]
    _flip(victim)
    bad = CliRunner().invoke(app, ["inspect", str(copy), "--check", "--json"])
    problems = json.loads(bad.output)["problems"]
    assert bad.exit_code == 1 and any(victim.name in p and "CRC-32" in p for p in problems), problems


# ---- cases 2 and 13: never follow a symlink out of the folder, except a hub cache's own blobs --------
def _hub_cache(hf_folder, cache, outside_link=None):
    """hf_folder laid out as huggingface_hub caches it: snapshots/<rev>/file -> ../../blobs/<sha>."""
    import hashlib
    import os

    repo = cache / "models--org--tiny"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in sorted(hf_folder.iterdir()):
        if f.is_file():
            sha = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy(f, repo / "blobs" / sha)
            os.symlink(f"../../blobs/{sha}", snap / f.name)
    if outside_link is not None:
        name, target = outside_link
        (snap / name).unlink(missing_ok=True)
        os.symlink(target, snap / name)
    return repo, snap


def test_hub_cache_snapshot_reads(checkpoints, tmp_path):
    from mzoo.jobs.sources import open_source

    repo, snap = _hub_cache(checkpoints["hf-src"], tmp_path / "hub")
    for path in (snap, repo):  # the snapshot, or the models--org--name folder (refs/main)
        src = open_source(path)
        assert src.fmt == "hf"
        for t in src.tensors:
            src.get(t.name)


def test_hub_cache_link_out_of_blobs_is_refused(checkpoints, tmp_path):
    from mzoo.jobs.sources import open_source

    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hf_private"}')
    _, snap = _hub_cache(checkpoints["hf-src"], tmp_path / "hub", ("tokenizer.json", str(secret)))
    with pytest.raises(CheckpointError, match="outside"):
        open_source(snap)


def test_weights_linked_out_of_the_folder_are_refused(checkpoints, tmp_path):
    import os

    from mzoo.jobs.sources import open_source

    copy = tmp_path / "hf"
    shutil.copytree(checkpoints["hf-src"], copy)
    weights = next(copy.glob("*.safetensors"))
    moved = tmp_path / "elsewhere.safetensors"
    weights.rename(moved)
    os.symlink(moved, weights)
    with pytest.raises(CheckpointError, match="outside"):
        open_source(copy)


def test_tokenizer_linked_out_of_the_folder_is_refused_by_convert(checkpoints, tmp_path):
    import os

    from typer.testing import CliRunner

    from mzoo.cli.main import app

    copy = tmp_path / "hf"
    shutil.copytree(checkpoints["hf-src"], copy)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    (copy / "tokenizer.json").unlink(missing_ok=True)
    os.symlink(secret, copy / "tokenizer.json")
    result = CliRunner().invoke(app, ["convert", "hf->hf", str(copy), str(tmp_path / "out")])
    assert result.exit_code == 2 and "outside" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_push_stage_refuses_any_file_linked_out_of_the_folder(checkpoints, tmp_path):
    """push uploads every file of an HF folder: a linked notes file must not carry a secret out."""
    import os

    from mzoo.jobs.push import stage
    from mzoo.jobs.sources import open_source

    copy = tmp_path / "hf"
    shutil.copytree(checkpoints["hf-src"], copy)
    secret = tmp_path / "token"
    secret.write_text("hf_private_token")
    os.symlink(secret, copy / "notes.txt")
    with pytest.raises(CheckpointError, match="outside"):
        src = open_source(copy)
        stage(src, tmp_path / "staged", src.assets, lambda n: None)
    assert not (tmp_path / "staged").exists()
