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
