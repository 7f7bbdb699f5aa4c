"""Issue 17 (validate): a layout the model cannot be split into, bad option values and bad config
types are refused in one sentence before any work, and argument mistakes are reported before torch
is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_hf_model
from transformers import LlamaConfig
from typer.testing import CliRunner

from mzoo.cli.main import app


def _refused(argv: list[str], needle: str) -> str:
    """The command exits 2 with exactly one `error:` line that contains `needle`, no traceback."""
    result = CliRunner().invoke(app, argv)
    text = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}\n{text}\n{result.exception!r}"
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert needle in errors[0], text
    return errors[0]


@pytest.fixture(scope="module")
def ffn160(tmp_path_factory) -> Path:
    """A llama whose heads (6) and groups (3) take TP 3 but whose FFN (160) does not."""
    root = tmp_path_factory.mktemp("ffn160")
    return make_hf_model(root / "llama", LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=160,
                                                     num_hidden_layers=2, num_attention_heads=6,
                                                     num_key_value_heads=3, max_position_embeddings=32))


# ---- case 18: a layout the model cannot be split into -------------------------------------------------------
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_convert_refuses_a_tp_that_does_not_divide_the_ffn(ffn160, tmp_path, fmt):
    out = tmp_path / "out"
    line = _refused(["convert", "hf->megatron", str(ffn160), str(out), "--tp", "3", "--megatron-format", fmt],
                    "does not divide the FFN size 160")
    assert "--tp" in line or "TP" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_convert_plan_refuses_it_too(ffn160, tmp_path):
    _refused(["convert", "hf->megatron", str(ffn160), str(tmp_path / "out"), "--tp", "3", "--plan"],
             "does not divide the FFN size 160")


def test_reshard_refuses_a_tp_that_does_not_divide_the_ffn(ffn160, tmp_path):
    src = tmp_path / "tp2"
    assert CliRunner().invoke(app, ["convert", "hf->megatron", str(ffn160), str(src), "--tp", "1", "-q"]).exit_code == 0
    out = tmp_path / "out"
    _refused(["reshard", str(src), str(out), "--tp", "3"], "does not divide the FFN size 160")
    assert not out.exists()


def test_train_refuses_a_tp_that_does_not_divide_the_ffn(tmp_path):
    _refused(["train", "llama-tiny", "--tp", "3", "--override", "ffn_hidden_size=160", "--override",
              "num_attention_heads=6", "--override", "num_query_groups=3", "--override", "hidden_size=48",
              "--mock-data", "--dry-run"], "does not divide the FFN size 160")


def test_convert_refuses_a_tp_that_does_not_divide_the_expert_ffn(tmp_path):
    from conftest import make_moe_model
    from transformers import MixtralConfig

    # dense parts take TP 3 (6 heads, 3 groups, 48 hidden); the experts' FFN (40) does not
    src = make_moe_model(tmp_path / "mixtral", MixtralConfig(vocab_size=96, hidden_size=48, intermediate_size=40,
                                                             num_hidden_layers=2, num_attention_heads=6,
                                                             num_key_value_heads=3, num_local_experts=2,
                                                             max_position_embeddings=32))
    _refused(["convert", "hf->megatron", str(src), str(tmp_path / "out"), "--tp", "3"],
             "does not divide the expert FFN size 40")


# ---- case 14: option values, checked before any work -----------------------------------------------------------
BAD_OPTIONS = {
    "micro batch 0": (["train", "llama-tiny", "--mock-data", "--micro-batch", "0"], "--micro-batch must be at least 1"),
    "global batch 0": (["train", "llama-tiny", "--mock-data", "--global-batch", "0"], "--global-batch must be at least 1"),
    "seq len 0": (["train", "llama-tiny", "--mock-data", "--seq-len", "0"], "--seq-len must be at least 1"),
    "negative lr": (["train", "llama-tiny", "--mock-data", "--lr", "-1"], "--lr must be a finite number, 0 or more"),
    "nan lr": (["train", "llama-tiny", "--mock-data", "--lr", "nan"], "got nan"),
    "inf min lr": (["train", "llama-tiny", "--mock-data", "--min-lr", "inf"], "--min-lr must be a finite number"),
    "negative steps": (["train", "llama-tiny", "--mock-data", "--steps", "-1"], "--steps must be at least 1"),
    "negative warmup": (["train", "llama-tiny", "--mock-data", "--warmup", "-2"], "--warmup must be 0 or more"),
    "zero eval iters": (["train", "llama-tiny", "--mock-data", "--eval-iters", "0"], "--eval-iters must be at least 1"),
    "bad port": (["train", "llama-tiny", "--mock-data", "--master-port", "70000"], "--master-port must be a port"),
    "finetune micro batch 0": (["finetune", "nope", "--data", "nope.jsonl", "--micro-batch", "0"],
                               "--micro-batch must be at least 1"),
    "valid fraction above 1": (["finetune", "nope", "--data", "nope.jsonl", "--valid-fraction", "1.5"],
                               "--valid-fraction must be at least 0 and below 1"),
    "verify batch 0": (["verify", "a", "b", "--batch", "0"], "--batch must be at least 1"),
    "verify seq len 0": (["verify", "a", "b", "--seq-len", "0"], "--seq-len must be at least 1"),
    "verify nan tolerance": (["verify", "a", "b", "--tolerance", "nan"], "--tolerance must be a finite number"),
    "top p 0": (["generate", "nope", "--prompt", "x", "--top-p", "0"], "--top-p must be above 0 and at most 1"),
    "top p above 1": (["generate", "nope", "--prompt", "x", "--top-p", "1.5"], "--top-p must be above 0"),
    "negative temperature": (["generate", "nope", "--prompt", "x", "--temperature", "-1"],
                             "--temperature must be a finite number, 0 or more"),
    "nan temperature": (["generate", "nope", "--prompt", "x", "--temperature", "nan"], "--temperature must be"),
    "zero new tokens": (["generate", "nope", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    "zero workers": (["data", "prepare", "c.jsonl", "--tokenizer", "t", "--out", "o", "--workers", "0"],
                     "--workers must be at least 1"),
    "headroom 1": (["plan", "llama3-8b", "--gpus", "8", "--headroom", "1"], "--headroom must be at least 0 and below 1"),
    "plan zero gpus": (["plan", "llama3-8b", "--gpus", "0"], "--gpus must be at least 1"),
    "convert zero pp": (["convert", "hf->megatron", "a", "b", "--pp", "0"], "--pp must be at least 1"),
    "reshard zero vocab": (["reshard", "a", "b", "--vocab-size", "0"], "--vocab-size must be at least 1"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_a_bad_option_value_is_one_sentence_naming_the_option(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needle = BAD_OPTIONS[case]
    _refused(argv, needle)
    assert not list(tmp_path.iterdir()), "nothing is written for a bad option"


def test_good_edge_values_pass_the_option_checks():
    """Boundaries that are allowed: --lr 0, --warmup 0, --top-p 1, --temperature 0, --valid-fraction 0."""
    from mzoo.cli.common import check_options
    from mzoo.cli.finetune import finetune
    from mzoo.cli.generate import generate

    check_options(finetune, {"lr": 0.0, "warmup": 0, "valid_fraction": 0.0, "micro_batch": 1})
    check_options(generate, {"top_p": 1.0, "temperature": 0.0})


_DRIVER = """
import sys, time
start = time.perf_counter()
from mzoo.cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    print("RESULT", e.code, "torch" in sys.modules, "transformers" in sys.modules,
          round(time.perf_counter() - start, 3), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["train", "llama-tiny", "--micro-batch", "0"],
                                  ["finetune", "ckpt", "--data", "d.jsonl", "--lr", "nan"],
                                  ["verify", "a", "b", "--batch", "0"],
                                  ["generate", "ckpt", "--prompt", "x", "--top-p", "2"],
                                  ["convert", "hf->megatron", "a", "b", "--tp", "0"]])
def test_a_bad_option_is_reported_before_torch_is_imported(argv, tmp_path):
    """A typo must not cost the 3-7 s of importing torch (and transformers) before it is reported."""
    r = subprocess.run([sys.executable, "-c", _DRIVER, *argv], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "COLUMNS": "200"}, timeout=120)
    result = [line for line in r.stderr.splitlines() if line.startswith("RESULT")]
    assert result, r.stderr
    _, code, torch_loaded, transformers_loaded, _seconds = result[0].split()
    assert (code, torch_loaded, transformers_loaded) == ("2", "False", "False"), r.stderr
    assert "error: --" in r.stderr and "Traceback" not in r.stderr


# ---- case 14: square brackets in paths are text, not rich markup -------------------------------------------------
def test_brackets_in_a_missing_path_are_printed_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("[/x]", "[red]x", "a[bold]b[/bold]"):
        line = _refused(["inspect", str(tmp_path / name)], "does not exist")
        assert f"{tmp_path / name} does not exist" in line, line


def test_brackets_in_a_checkpoint_path_are_printed_as_written(ffn160, tmp_path):
    src = tmp_path / "[bold]m[b]"
    shutil.copytree(ffn160, src)
    result = CliRunner().invoke(app, ["inspect", str(src)])
    assert result.exit_code == 0, result.output
    assert f"{src}: hf" in result.output
    dst = tmp_path / "[red]out[x]"
    result = CliRunner().invoke(app, ["convert", "hf->megatron", str(src), str(dst), "--pp", "2"])
    assert result.exit_code == 0, result.output
    assert str(dst) in result.output and dst.is_dir()
