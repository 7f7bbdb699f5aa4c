"""Issue 17, case 11: a destination that will not fit is refused before any work, in one sentence with
needed vs free. MZOO_FREE_BYTES (a documented test hook) stands in for a nearly full disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mzoo.ckpt.atomic import DiskFullError
from mzoo.data.prepare import PrepareConfig, prepare

MZOO = str(Path(sys.executable).with_name("mzoo"))


def test_init_refuses_an_output_that_will_not_fit(tmp_path: Path) -> None:
    env = {**os.environ, "MZOO_FREE_BYTES": str(1 << 20)}
    out = subprocess.run([MZOO, "init", "llama-tiny", str(tmp_path / "m")], env=env, capture_output=True, text=True,
                         timeout=120)
    err = " ".join(out.stderr.split())
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "needs about" in err and "1.0 MiB free" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_data_prepare_refuses_an_output_that_will_not_fit(tmp_path: Path, monkeypatch) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "%s"}\n' % ("word " * 20000) * 1000)  # about 100 MB of text
    monkeypatch.setenv("MZOO_FREE_BYTES", str(10 << 20))
    with pytest.raises(DiskFullError, match=r"needs about .* but .* has 10.0 MiB free"):
        prepare(PrepareConfig(inputs=[corpus], tokenizer=tmp_path / "no-tokenizer", out=str(tmp_path / "d")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


# ---- convert, reshard, train and finetune saves: estimated before any work ---------------------------------
FULL, ROOMY = str(1 << 20), str(1 << 30)  # 1 MiB free (nothing fits), 1 GiB (a tiny model fits)
TRAIN = ("--mock-data", "--steps", "2", "--seq-len", "16", "--micro-batch", "1", "--global-batch", "1",
         "--device", "cpu")


def cli(*args) -> object:
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *needles: str) -> str:
    """Exit != 0, one `error:` sentence naming what is needed and what is free, no traceback."""
    text = " ".join(result.output.split())
    assert result.exit_code != 0, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    assert "needs about" in text and "1.0 MiB free" in text, text
    for needle in needles:
        assert needle in text, text
    return text


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """llama-tiny as HF (with a tokenizer, for finetuning) and as a torch_dist checkpoint, plus SFT data."""
    import json

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from test_sft import make_tokenizer  # the word-level tokenizer the finetuning tests use

    root = tmp_path_factory.mktemp("space")
    assert cli("init", "llama-tiny", root / "hf").exit_code == 0
    make_tokenizer(root / "hf")
    assert cli("convert", "hf->megatron", root / "hf", root / "dist", "--quiet").exit_code == 0
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": "w1 w2", "completion": "w2 w1"}) + "\n"
                                            for _ in range(8)))
    return root


def test_convert_and_reshard_refuse_an_output_that_will_not_fit(models, tmp_path, monkeypatch):
    monkeypatch.setenv("MZOO_FREE_BYTES", FULL)
    refused(cli("convert", "hf->megatron", models / "hf", tmp_path / "m", "--quiet"), f"writing {tmp_path / 'm'}")
    refused(cli("convert", "megatron->hf", models / "dist", tmp_path / "h", "--quiet"))
    refused(cli("reshard", models / "dist", tmp_path / "r", "--tp", "2", "--quiet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setenv("MZOO_FREE_BYTES", ROOMY)
    assert cli("reshard", models / "dist", tmp_path / "r", "--tp", "2", "--quiet").exit_code == 0
    assert (tmp_path / "r" / "latest_checkpointed_iteration.txt").exists()


def test_output_bytes_is_what_a_conversion_writes(models, tmp_path):
    """The estimate is the tensors' bytes at the target dtype: within a few percent of the files written."""
    from mzoo.jobs.convert import output_bytes
    from mzoo.jobs.sources import open_source

    assert cli("convert", "hf->megatron", models / "hf", tmp_path / "m", "--dtype", "bf16", "--quiet").exit_code == 0
    import torch

    need = output_bytes(open_source(models / "hf").tensors, torch.bfloat16)
    written = sum(p.stat().st_size for p in (tmp_path / "m").rglob("*.distcp"))
    assert 0.9 * written <= need <= written


def test_train_refuses_before_step_1_when_its_first_save_will_not_fit(tmp_path, monkeypatch):
    """The first save (weights + Adam state) is estimated before the run starts: no step is trained
    for a save that cannot be written, nothing is created."""
    monkeypatch.setenv("MZOO_FREE_BYTES", FULL)
    text = refused(cli("train", "llama-tiny", *TRAIN, "--save", tmp_path / "ckpt", "--save-interval", "1"),
                   "saving iteration 1 (weights and optimizer state)")
    assert "step" not in text.split("error:")[0]  # refused before any step line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setenv("MZOO_FREE_BYTES", ROOMY)
    result = cli("train", "llama-tiny", *TRAIN, "--save", tmp_path / "ckpt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ckpt" / "iter_0000002").is_dir()


def test_finetune_refuses_before_step_1_when_its_save_will_not_fit(models, tmp_path, monkeypatch):
    args = ("finetune", models / "hf", "--data", models / "sft.jsonl", "--format", "prompt-completion",
            "--seq-len", "16", "--steps", "1", "--global-batch", "2", "--micro-batch", "1", "--device", "cpu",
            "--save", tmp_path / "ft")
    monkeypatch.setenv("MZOO_FREE_BYTES", FULL)
    refused(cli(*args), "saving the finetuned model (hf) at step 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setenv("MZOO_FREE_BYTES", ROOMY)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ft" / "config.json").exists()
