"""Writers never destroy what they were not asked to replace (issue 17, cases 1, 3, 7): `--save` is
checked before any work, and re-saving an iteration never deletes the only checkpoint first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_hf_model
from typer.testing import CliRunner

from mzoo.cli.main import app

TRAIN = ["train", "llama-tiny", "--mock-data", "--steps", "2", "--seq-len", "16", "--global-batch", "2",
         "--micro-batch", "1", "--json"]


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from test_sft import make_tokenizer  # the word-level tokenizer the finetuning tests use

    folder = tmp_path_factory.mktemp("ft")
    make_hf_model(folder / "model", LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64))
    make_tokenizer(folder / "model")
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": "w1 w2", "completion": "w2 w1"}) + "\n"
                                                for _ in range(16)))
    return folder


def precious(folder: Path) -> dict[str, bytes]:
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "thesis.txt").write_text("years of work")
    (folder / "data.txt").write_text("keep")
    return tree(folder)


def finetune(base: Path, save: Path, *extra) -> object:
    return cli("finetune", base / "model", "--data", base / "train.jsonl", "--format", "prompt-completion",
               "--seq-len", "16", "--steps", "1", "--global-batch", "2", "--micro-batch", "1", "--save", save, *extra)


def test_finetune_save_refuses_a_folder_that_holds_files(base, tmp_path):  # case 1
    before = precious(tmp_path / "precious")
    result = finetune(base, tmp_path / "precious")
    assert result.exit_code == 2, result.output
    assert "already holds files" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output and tree(tmp_path / "precious") == before


def test_finetune_save_into_the_base_models_own_folder_keeps_it(base, tmp_path):  # case 1: --save $PWD
    work = tmp_path / "work"
    shutil.copytree(base, work)
    before = tree(work)
    result = finetune(work, work)
    assert result.exit_code == 2 and "already holds files" in result.output, result.output
    assert tree(work) == before


def test_finetune_save_overwrite_replaces_when_asked(base, tmp_path):  # case 1
    precious(tmp_path / "out")
    result = finetune(base, tmp_path / "out", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "data.txt").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "is a file, not a folder"),
    (lambda p: precious(p), "is no checkpoint root"),
    (lambda p: (p.parent / "file").write_text("x"), "is a file, not a folder"),
], ids=["save is a file", "unrelated folder", "parent is a file"])
def test_train_save_is_checked_before_training(tmp_path, make, message):  # cases 1, 7
    save = tmp_path / "save"
    make(save)
    target = tmp_path / "file" / "save" if message == "is a file, not a folder" and not save.exists() else save
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli(*TRAIN, "--save", target)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and '"losses"' not in result.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_fresh_train_into_an_old_root_does_not_replace_its_iteration(tmp_path):  # case 3
    root = tmp_path / "ckpt"
    assert cli(*TRAIN, "--save", root).exit_code == 0
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    again = cli(*TRAIN, "--seed", "7", "--save", root)
    assert again.exit_code == 2 and "already holds iteration 2 from another run" in again.output, again.output
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert cli(*TRAIN, "--seed", "7", "--save", root, "--overwrite").exit_code == 0


RESAVE = r'''
import sys, torch
from pathlib import Path
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
from mzoo.ckpt.megatron.write import add_iteration
from mzoo.models.canonical import canonical_tensors
from mzoo.zoo import resolve
cfg = resolve("llama-tiny")
tensors = canonical_tensors(cfg)
seed, iteration = int(sys.argv[2]), int(sys.argv[3])
gen = torch.Generator().manual_seed(seed)
values = {t.name: torch.full(t.shape, float(seed)) for t in tensors}
add_iteration(Path(sys.argv[1]), cfg, tensors, values.__getitem__,
              Target("torch_dist", MegatronCheckpoint(iteration=iteration), torch.float32), torch.float32, iteration)
'''


def resave(root: Path, seed: int, iteration: int, fault: str = "") -> int:
    env = {**os.environ, "MZOO_FAULT": fault}
    return subprocess.run([sys.executable, "-c", RESAVE, str(root), str(seed), str(iteration)], env=env,
                          capture_output=True, text=True, timeout=300).returncode


@pytest.mark.parametrize("window", ["before-switch", "after-exchange", "after-tracker"])
def test_resaving_an_iteration_killed_at_each_window_keeps_a_complete_one(tmp_path, window):  # case 3
    from mzoo.jobs.inspect import describe
    from mzoo.jobs.sources import open_source

    root = tmp_path / "ckpt"
    assert resave(root, 1, 5) == 0
    assert resave(root, 2, 5, window) == -9  # killed there
    info = describe(root, check=True)
    assert info["iteration"] == 5 and info["problems"] == [], info
    assert info["leftovers"] and all(".mzoo-" in p for p in info["leftovers"]), info  # inspect names what was left
    shown = cli("inspect", root)
    assert shown.exit_code == 0 and "leftover" in shown.stdout and "interrupted run" in shown.stdout
    src = open_source(root)
    value = {float(src.get(t.name).flatten()[0]) for t in src.tensors}
    assert value in ({1.0}, {2.0})  # the old copy or the new one, whole
