"""`mzoo train` sizes itself before it allocates: a preset's published recipe is what it trains with
unless a flag overrides it, and a run whose estimated peak exceeds the device stops in one sentence
that names both numbers and what would fit; `--device` asks for a device explicitly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mzoo.cli.main import app
from mzoo import capacity

MZOO = str(Path(sys.executable).with_name("mzoo"))


def run(*args, cwd):
    return subprocess.run([MZOO, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_headline_command_refuses_in_seconds_with_both_numbers(tmp_path):
    """llama3-8b on a CPU machine: the estimate (hundreds of GiB) against the host's memory, exit 2,
    one sentence, before a weight is allocated (the process stays small)."""
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", MZOO, "train", "llama3-8b", "--steps", "1", "--mock-data"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - start < 30
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    message, peak_kib = lines[0], int(lines[-1])
    assert message.startswith("error: llama3-8b at tp=1") and message.endswith("(--force starts anyway).")
    assert "seq 8192" in message  # the recipe's sequence length, not a toy default
    need = float(message.split("needs about ")[1].split(" GiB")[0])
    offers = float(message.split("offers ")[1].split(" GiB")[0])
    assert need > 100 and offers == pytest.approx(capacity.host_available() / 2**30, rel=0.2)
    assert "even its weights, gradients and optimizer state need" in message
    assert peak_kib < 2 * 2**20  # under 2 GB: nothing model-sized was allocated
    assert not list(tmp_path.iterdir())


def test_a_run_that_does_not_fit_is_told_the_flags_that_would(monkeypatch):
    """With the machine's memory set to 60 MiB, llama-tiny's recipe-free defaults fit only with
    recomputation and shorter sequences; --force trains anyway with a warning."""
    monkeypatch.setattr(capacity, "host_available", lambda: 60 * 2**20)
    args = ["train", "llama-tiny", "--mock-data", "--steps", "1", "--seq-len", "4096", "--micro-batch", "4",
            "--global-batch", "4", "--override", "max_position_embeddings=4096"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "but this machine offers 0.1 GiB" in text  # 60 MiB
    assert "--recompute full" in text and "would fit" in text
    forced = CliRunner().invoke(app, [*args, "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert "starting anyway (--force)" in forced.output


def test_the_recipe_is_used_unless_overridden(tmp_path):
    proc = run("train", "llama3-8b", "--mock-data", "--dry-run", "--json", "--dp", "8", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["memory"]["device"] == "cuda" and report["memory"]["profile"] == "mzoo-bf16"  # GPU default: bf16
    proc = run("train", "llama3-8b", "--mock-data", "--dry-run", "--json", "--seq-len", "1024", cwd=tmp_path)
    small = json.loads(proc.stdout)
    assert small["memory"]["activations_gb"] < report["memory"]["activations_gb"] / 4  # 1024 tokens, not 8192
    assert small["memory"]["profile"] == "mzoo-fp32"  # the CPU default: the exact reference


def test_llama3_8b_dry_run_on_gpus_is_within_5_percent_of_megatrons_profile():
    """TP1 DP8 at the recipe (seq 8192, micro batch 1), bf16 with the distributed optimizer: mzoo's
    engine now keeps Megatron's 2 + 4 + 12/dp bytes per parameter and its activations."""
    from mzoo.layout import Layout
    from mzoo.plan.memory import memory
    from mzoo.plan.profile import engine_profile, megatron_profile
    from mzoo.plan.settings import Settings
    from mzoo.zoo import get

    cfg = get("llama3-8b").config
    layout, settings = Layout(dp=8), Settings(8192, 512, 1, distributed_optimizer=True)
    engine = memory(cfg, layout, settings, engine_profile("bf16", device="cuda")).total
    megatron = memory(cfg, layout, settings, megatron_profile()).total
    assert abs(engine / megatron - 1) < 0.05, (engine / 2**30, megatron / 2**30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_one_is_one_sentence(tmp_path):
    proc = run("train", "llama-tiny", "--mock-data", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0].startswith("error: --device cuda was asked for, but this torch")
    assert run("train", "llama-tiny", "--mock-data", "--device", "tpu", cwd=tmp_path).returncode == 2


def test_gpus_without_a_layout_asks_the_planner(tmp_path):
    """--gpus 8 and no --tp/--pp/--dp: the planner's fastest layout that mzoo's engine runs and fits,
    with the sentence saying why; the dry run then reports exactly that layout."""
    from mzoo.plan.hardware import gpu
    from mzoo.plan.profile import engine_profile
    from mzoo.plan.search import plan
    from mzoo.plan.settings import Settings
    from mzoo.zoo import get

    proc = run("train", "llama3-8b", "--gpus", 8, "--mock-data", "--dry-run", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    why = " ".join(proc.stdout.split())
    assert why.startswith("layout from the planner: ") and "fit 8 x h100-80gb" in why
    settings = Settings(8192, 512, 1, distributed_optimizer=True)
    best = plan(get("llama3-8b").config, 8, settings, gpu("h100-80gb"), engine_profile("bf16", True, "cuda", overlap=True))[0]
    assert f"layout from the planner: {best.layout.label()} " in why
    report = json.loads(run("train", "llama3-8b", "--gpus", 8, "--mock-data", "--dry-run", "--device", "cuda", "--json",
                            cwd=tmp_path).stdout)
    assert (report["layout"]["tp"], report["layout"]["pp"], report["layout"]["dp"]) == (
        best.layout.tp, best.layout.pp, best.layout.dp)
    cpu = run("train", "llama-tiny", "--gpus", 2, "--mock-data", "--device", "cpu", cwd=tmp_path)
    assert cpu.returncode == 2 and "the planner picks layouts for GPUs" in cpu.stderr
