"""megatron-core loads mzoo's zarr checkpoints at Megatron-LM's default strictness.

megatron-core 0.16.0 deleted the zarr load strategy, so the pinned 0.16.1 cannot load a zarr
checkpoint. It still ships the other half of that backend, strategies/common.py, which saves and
loads the ShardedObjects (the linears' `_extra_state`) and is the same file as in 0.15.3. The first
tests run it here: for a LLaMA at TP2 and a Mixtral at EP2, megatron-core loads every object its
model asks for from mzoo's zarr folder, and the files it saves itself are mzoo's, byte for byte.

The last test needs the real thing and skips unless MZOO_MCORE015_PYTHON names a python whose
megatron-core is 0.15.x or older, with tensorstore installed. That python also needs torch, pytest
and mzoo's dependencies; mzoo itself comes from this checkout. The cheap way is the main venv with
megatron-core 0.15.3 put in front of its own 0.16.1:

    .venv/bin/python -m pip install --no-deps --target /tmp/mc0153 megatron-core==0.15.3
    printf '#!/bin/sh\\nPYTHONPATH=/tmp/mc0153 exec %s "$@"\\n' "$PWD/.venv/bin/python" > /tmp/mc0153.sh
    chmod +x /tmp/mc0153.sh
    MZOO_MCORE015_PYTHON=/tmp/mc0153.sh .venv/bin/python -m pytest -s tests/converters/test_megatron_core_zarr.py

Here mzoo writes a tiny LLaMA (and a Mixtral) as zarr at TP1/EP1 and keeps transformers' logits.
Then this file runs itself under that python (`--side FOLDER`, as benchmarks/tf4.py does). There,
megatron-core's GPTModel (local spec, CPU shim in tests/) loads each checkpoint at TP2 (the
Mixtral at EP2) with dist_checkpointing.load at the default strictness, with no strategy given.
The test holds the logits to transformers' within 1e-4 and prints max |difference| per model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PADDED = 1024  # vocabulary 1000 padded to a multiple of 128 (x TP 1 or 2)
IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
SIDE_PYTHON = "MZOO_MCORE015_PYTHON"


def _hf_configs() -> dict:
    from transformers import LlamaConfig, MixtralConfig

    return {
        "llama": LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128),
        "mixtral": MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                 num_experts_per_tok=2, max_position_embeddings=128),
    }


def _parallel(name: str) -> dict[str, int]:
    """How megatron-core splits each model on its 2 ranks: the LLaMA over TP, the Mixtral over EP."""
    return {"tp": 2, "ep": 1} if name == "llama" else {"tp": 1, "ep": 2}


# ---- rank functions (module level: dist.run spawns them) -----------------------------------------
def _objects(rank, world, cfg, tp, ep, mzoo_folder, save_to):
    import mcore_ref as R

    model = R.build_gpt_model(cfg, tp=tp, padded_vocab=PADDED, ep=ep)
    return R.pack(R.zarr_objects(model, mzoo_folder, save_to))


def _load_zarr(rank, world, cfg, tp, ep, folder, ids):
    import mcore_ref as R

    model = R.build_gpt_model(cfg, tp=tp, padded_vocab=PADDED, ep=ep)
    common = R.load_dist_checkpoint(model, folder)  # default strictness, strategy from metadata.json
    return R.pack((R.logits(model, ids), common["_incompatible_keys"]))


# ---- the main interpreter ------------------------------------------------------------------------
def _write(work: Path, name: str) -> tuple[Path, torch.Tensor]:
    """An HF model made by transformers, mzoo's zarr of it (TP1, EP1, local spec), HF's logits."""
    from conftest import make_hf_model, make_moe_model
    from transformers import AutoModelForCausalLM

    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    hf = (make_hf_model if name == "llama" else make_moe_model)(work / f"{name}-hf", _hf_configs()[name])
    out = work / f"{name}-zarr"
    convert(open_source(hf), out, Target("zarr", MegatronCheckpoint(spelling="local")))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(IDS).logits
    torch.save({"cfg": open_source(out).cfg, "ids": IDS, **_parallel(name)}, out / "side-input.pt")
    return out, expected


def _shard_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.glob("*/shard_*.pt")}


@pytest.mark.dist
@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_megatron_core_object_strategy_reads_and_writes_mzoo_zarr_objects(tmp_path, name):
    import dist as D
    import mcore_ref as R

    if R.common_in_dcp():  # make test-mcore-latest
        pytest.skip("megatron-core >= 0.17 has no zarr object strategy (strategies/common.py lost "
                    "TorchCommonLoadStrategy); only <= 0.15.3 loads zarr")

    out, _ = _write(tmp_path, name)
    folder, ref = out / "release", tmp_path / "megatron-objects"
    ref.mkdir()
    side = torch.load(out / "side-input.pt", weights_only=False)
    loaded: dict = {}
    for rank in D.run(_objects, 2, side["cfg"], side["tp"], side["ep"], folder, ref):
        loaded.update(R.unpack(rank))
    assert loaded and all(v is None for v in loaded.values())
    ours = _shard_files(folder)
    assert {f"{k}.pt" for k in loaded} == set(ours)  # what the model asks for is what mzoo wrote
    assert _shard_files(ref) == ours  # and megatron-core's own zarr save writes the same bytes


def _side_python() -> str:
    python = os.environ.get(SIDE_PYTHON)
    if not python:
        pytest.skip(f"{SIDE_PYTHON} is not set (a python with megatron-core <= 0.15.3; see this file's docstring)")
    if not Path(python).is_file():
        pytest.fail(f"{SIDE_PYTHON}={python} is not a file; name the python of a megatron-core 0.15.x environment.")
    return python


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_core_015_loads_mzoo_zarr_at_default_strictness(tmp_path):
    python = _side_python()
    written = {name: _write(tmp_path, name) for name in _hf_configs()}
    run = subprocess.run([python, __file__, "--side", str(tmp_path)], capture_output=True, text=True, cwd="/",
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    print(run.stdout.strip())
    for name, (out, expected) in written.items():
        for rank, (logits, incompatible) in enumerate(torch.load(out / "side-output.pt", weights_only=False)):
            diff = (logits[..., :1000] - expected).abs().max().item()
            print(f"{name} {_parallel(name)} rank {rank}: max|logits - transformers| = {diff:.2e}")
            assert diff <= 1e-4 and incompatible == ([], []), (name, rank, incompatible)


# ---- the side interpreter (megatron-core 0.15.x) -------------------------------------------------
def _side(work: Path) -> None:
    """Load every `*-zarr` checkpoint under `work` in this interpreter's megatron-core; save the logits."""
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here.parent.parent)]  # tests/ (dist, mcore_ref), the checkout (mzoo)
    import megatron.core
    from packaging.version import Version

    import dist as D
    import mcore_ref as R

    version = megatron.core.__version__
    if Version(version) >= Version("0.16.0"):
        sys.exit(f"{sys.executable} has megatron-core {version}; zarr loads need 0.15.x or older.")
    print(f"megatron-core {version} from {Path(megatron.core.__file__).parent}")
    for out in sorted(work.glob("*-zarr")):
        side = torch.load(out / "side-input.pt", weights_only=False)
        ranks = D.run(_load_zarr, 2, side["cfg"], side["tp"], side["ep"], out / "release", side["ids"])
        torch.save([R.unpack(r) for r in ranks], out / "side-output.pt")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--side":
        sys.exit(f"usage: {sys.argv[0]} --side FOLDER (run by the test; see the docstring)")
    _side(Path(sys.argv[2]))
