"""Writers never destroy what they were not asked to replace (issue 17, cases 1, 3, 7): `--save` is
checked before any work, and re-saving an iteration never deletes the only checkpoint first."""

from __future__ import annotations

import json
import shutil
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


