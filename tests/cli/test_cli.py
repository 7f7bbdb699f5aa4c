"""The mzoo command as users type it: in-process through Typer's runner (fast), plus the installed
entry point in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from informative import informative_init

MZOO = [str(Path(sys.executable).with_name("mzoo"))]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def mzoo(*args, check=True) -> Result:
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    out = Result(r.exit_code, r.stdout, r.stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"mzoo {' '.join(map(str, args))} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def test_installed_entry_point():
    proc = subprocess.run(MZOO + ["zoo", "list", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)
    proc = subprocess.run(MZOO + ["zoo", "show", "nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown preset" in proc.stderr and "Traceback" not in proc.stderr


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
        (["train", "mixtral-tiny", "--ep", "3", "--save", "x"], "expert parallel size 3 does not divide the 4 experts"),
        (["train", "llama-tiny", "--ep", "2", "--save", "x"], "expert parallelism (--ep 2) needs a mixture-of-experts"),
        (["init", "llama-tiny", "x", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    ],
)
def test_user_errors_are_one_sentence_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = mzoo(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_init_then_from_pretrained(tmp_path):
    out = tmp_path / "tiny"
    summary = json.loads(mzoo("init", "gpt-tiny", str(out), "--seed", "3", "--json").stdout)
    assert summary["params"] == 172_288
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt2"
    block = model.transformer.h[0]  # Megatron's init: norms at 1, biases at 0 (tests make them informative)
    assert torch.equal(block.ln_1.weight, torch.ones(64)) and not block.attn.c_attn.bias.any()


def test_demo_runs_end_to_end():
    data = json.loads(mzoo("demo", "--json").stdout)
    assert data["match"] and data["transformers_vs_mzoo"]["max_abs_diff"] <= 1e-4
    assert data["hf_vs_megatron_tp2pp2"]["max_abs_diff"] == 0.0
    assert data["learned"] and data["losses"][-1] < data["losses"][0] - 0.5
    assert data["trained_vs_hf"]["max_abs_diff"] == 0.0


def _commands(command, path: tuple[str, ...] = ()):
    """Every command the app registers, as its argv path; groups are walked, not listed."""
    if not hasattr(command, "list_commands"):
        yield path
        return
    ctx = command.context_class(command)
    for name in command.list_commands(ctx):
        yield from _commands(command.get_command(ctx, name), (*path, name))


def test_every_command_has_help_with_an_example():
    import typer.main

    from mzoo.cli.main import app

    paths = list(_commands(typer.main.get_command(app)))
    assert {("push",), ("generate",), ("finetune",), ("plan",), ("zoo", "show"), ("data", "prepare")} <= set(paths)
    for path in paths:  # the example runs the command itself, as users type it
        assert f"Example: mzoo {' '.join(path)} " in mzoo(*path, "--help").stdout, path


def test_convert_reshard_inspect_verify(tmp_path):
    hf, mc, mc2, back = (str(tmp_path / n) for n in ("hf", "mc", "mc2", "back"))
    informative_init("gpt-tiny", tmp_path / "hf")  # `mzoo init` with norms and biases a lost one would show
    summary = json.loads(mzoo("convert", "hf->megatron", hf, mc, "--tp", "2", "--pp", "2", "--json").stdout)
    assert summary["dst_format"] == "torch_dist" and summary["bytes"] > 0 and summary["peak_rss_gb"] > 0
    info = json.loads(mzoo("inspect", mc, "--json").stdout)
    assert {"format", "tp", "pp", "vpp", "num_params", "dtype"} <= set(info)
    assert info["format"] == "torch_dist" and info["num_params"] == 172_288 and info["problems"] == []
    mzoo("reshard", mc, mc2, "--tp", "1", "--pp", "2", "--vpp", "1", "--megatron-format", "torch", "--spec", "local")
    legacy = json.loads(mzoo("inspect", mc2, "--json").stdout)
    assert (legacy["format"], legacy["tp"], legacy["pp"], legacy["spec"]) == ("torch", 1, 2, "local")
    mzoo("convert", "megatron:hf", mc2, back)
    result = json.loads(mzoo("verify", hf, back, "--json").stdout)
    assert result["match"] and result["max_abs_diff"] == 0.0
    out = mzoo("convert", "hf->megatron", hf, str(tmp_path / "human")).stdout
    assert "GB/s" in out and "peak RSS" in out


def test_verify_exit_code_on_different_models(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    mzoo("init", "llama-tiny", a, "--seed", "1")
    mzoo("init", "llama-tiny", b, "--seed", "2")
    proc = mzoo("verify", a, b, "--json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["match"] is False


def test_unquoted_arrow_accident(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "megatron").write_text("")  # what `mzoo convert hf->megatron ...` leaves behind
    proc = mzoo("convert", "hf-", "src", "dst", check=False)
    assert proc.returncode == 2
    assert "quote it" in proc.stderr and "'hf->megatron'" in proc.stderr


def test_convert_bad_input_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf = str(tmp_path / "hf")
    mzoo("init", "llama-tiny", hf)
    for args, message in [
        (["convert", "hf->megatron", hf, "out", "--tp", "3"], "does not divide the 2 query groups"),
        (["convert", "hf->megatron", hf, "out", "--megatron-format", "npz"], "unknown --megatron-format"),
        (["convert", "megatron->hf", hf, "out"], "is a Hugging Face checkpoint, not Megatron"),
        (["convert", "hf->megatron", "missing", "out"], "does not exist"),
        (["convert", "hf->bert", hf, "out"], "unknown direction"),
    ]:
        proc = mzoo(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "\n" not in proc.stderr.strip(), proc.stderr
        assert not (tmp_path / "out").exists()
