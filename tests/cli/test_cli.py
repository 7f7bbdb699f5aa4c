"""The mzoo command as users type it (a subprocess, the installed entry point)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MZOO = [str(Path(sys.executable).with_name("mzoo"))]


def mzoo(*args, check=True):
    proc = subprocess.run(MZOO + list(args), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"mzoo {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_zoo_list_json():
    rows = json.loads(mzoo("zoo", "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert {"name", "family", "params", "active_params"} <= set(rows[0])
    assert by_name["llama3-8b"]["params"] == 8_030_261_248
    assert by_name["mixtral-8x7b"]["active_params"] < by_name["mixtral-8x7b"]["params"]
    llama = json.loads(mzoo("zoo", "list", "--family", "llama", "--json").stdout)
    assert {r["family"] for r in llama} == {"llama"}


def test_zoo_show():
    out = mzoo("zoo", "show", "llama3.1-405b").stdout
    assert "405.9B" in out and "llama3" in out
    data = json.loads(mzoo("zoo", "show", "deepseek-v3", "--json").stdout)
    assert data["config"]["mla"]["kv_lora_rank"] == 512


@pytest.mark.parametrize(
    "args, message",
    [
        (["zoo", "show", "llama3-8"], "unknown preset 'llama3-8'; did you mean"),
        (["zoo", "list", "--family", "bert"], "unknown family 'bert'"),
        (["init", "llama-tiny", "/nonexistent/dir/out"], "parent folder /nonexistent/dir does not exist"),
        (["init", "mixtral-tiny", "x"], "no Hugging Face adapter for family 'mixtral'"),
        (["init", "llama-tiny", "x", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    ],
)
def test_user_errors_are_one_sentence_exit_2(args, message, tmp_path):
    proc = subprocess.run(MZOO + args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_init_then_from_pretrained(tmp_path):
    out = tmp_path / "tiny"
    summary = json.loads(mzoo("init", "gpt-tiny", str(out), "--seed", "3", "--json").stdout)
    assert summary["params"] == 172_288
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"


def test_demo_runs_end_to_end():
    data = json.loads(mzoo("demo", "--json").stdout)
    assert data["match"] and data["max_abs_diff"] <= 1e-4


def test_every_command_has_help_with_an_example():
    for cmd in (["zoo", "list"], ["zoo", "show"], ["init"], ["demo"]):
        assert "Example:" in mzoo(*cmd, "--help").stdout, cmd
