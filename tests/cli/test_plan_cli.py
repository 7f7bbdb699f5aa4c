"""`mzoo plan` and `mzoo train --dry-run` as users type them (in-process through Typer's runner)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest

from mzoo.layout import Layout
from mzoo.plan.costs import rank_params
from mzoo.zoo import get


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def mzoo(*args) -> Result:
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Result(r.exit_code, r.stdout, r.stderr)


LAYOUT_KEYS = {"gpu", "tp", "pp", "vpp", "ep", "etp", "cp", "dp", "feasible", "memory_gb", "mfu", "step_s", "memory",
               "time", "verdict", "mzoo_engine"}


def test_plan_json_top_layouts():
    r = mzoo("plan", "llama3-8b", "--gpus", 8, "--seq-len", 8192, "--global-batch", 512, "--top", 3, "--json")
    assert r.returncode == 0, r.stderr
    layouts = json.loads(r.stdout)
    assert isinstance(layouts, list)
    assert all(row["model"] == "llama3-8b" and row["gpus"] == 8 and row["settings"]["seq_len"] == 8192
               for row in layouts)
    assert len(layouts) == 3 and all(LAYOUT_KEYS <= set(row) for row in layouts)
    assert all(row["feasible"] and row["tp"] * row["pp"] * row["cp"] * row["dp"] == 8 for row in layouts)
    assert [row["step_s"] for row in layouts] == sorted(row["step_s"] for row in layouts)
    assert {"weights_gb", "gradients_gb", "optimizer_gb", "activations_gb", "logits_gb", "buffers_gb",
            "overhead_gb"} <= set(layouts[0]["memory"])
    assert layouts[0]["explanation"].startswith(layouts[0]["label"])
    assert all("explanation" not in row for row in layouts[1:])


def test_plan_table_compares_gpu_types():
    r = mzoo("plan", "mixtral-8x7b", "--gpus", 16, "--gpu", "h100-80gb", "--gpu", "h200", "--top", 2)
    assert r.returncode == 0, r.stderr
    assert "h100-80gb: best 2 layouts" in r.stdout and "h200: best 2 layouts" in r.stdout
    assert "is the fastest layout that fits" in r.stdout


def test_check_fits_and_does_not_fit():
    fits = mzoo("plan", "llama3-70b", "--gpus", 64, "--seq-len", 8192, "--global-batch", 512,
                "--check", "tp=4,pp=4,vpp=5,cp=2", "--engine", "megatron")
    assert fits.returncode == 0 and "fits:" in fits.stdout and "memory (GiB" in fits.stdout
    ours = mzoo("plan", "llama3-70b", "--gpus", 64, "--seq-len", 8192, "--global-batch", 512,
                "--check", "tp=4,pp=4,vpp=5,cp=2")  # ranked for mzoo's engine by default: it runs CP
    assert ours.returncode == 1 and "cp comm" in ours.stdout  # evaluated on mzoo's engine: valid, too big
    assert "context parallelism" not in ours.stdout and "does not fit" in ours.stdout
    assert "Megatron-Core + TE: fits:" in ours.stdout  # the labelled comparison
    tight = mzoo("plan", "llama3-70b", "--gpus", 8, "--seq-len", 8192, "--global-batch", 512, "--check", "tp=1,pp=1",
                 "--json")
    assert tight.returncode == 1
    (layout,) = json.loads(tight.stdout)
    assert not layout["feasible"] and layout["dp"] == 8 and layout["memory_gb"] > 80
    assert layout["verdict"].startswith("does not fit") and "largest part" in layout["verdict"]
    invalid = mzoo("plan", "llama3-8b", "--gpus", 8, "--check", "tp=8,pp=1,dp=2")
    assert invalid.returncode == 2 and "not valid" in invalid.stdout


@pytest.mark.parametrize("args, message", [
    (["llama3-8b", "--gpus", 8, "--gpu", "h900"], "unknown GPU 'h900'; use one of h100-80gb, h200, a100-80gb, b200"),
    (["llama3-8b", "--gpus", 8, "--check", "tp=4,pp"], "--check 'tp=4,pp' is malformed"),
    (["llama3-8b", "--gpus", 8, "--check", "tp=two"], "tp needs a positive integer"),
    (["llama-tiny", "--gpus", 7, "--global-batch", 8], "no layout of 7 GPUs is valid for llama-tiny"),
    (["llama3-8b", "--gpus", 8, "--gpu", "a100-80gb", "--fp8"], "has no FP8 tensor cores"),
    (["llama3-8b", "--gpus", 0], "--gpus must be at least 1"),
])
def test_bad_plan_input_is_one_sentence(args, message):
    r = mzoo("plan", *args)
    assert r.returncode == 2, r.stdout
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ---- mzoo train --dry-run -----------------------------------------------------------------------------
def _dry_run(*args) -> dict:
    r = mzoo("train", *args, "--mock-data", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_dry_run_llama_tiny_tp2_pp2_every_rank():
    cfg = get("llama-tiny").config
    for rank in range(4):
        out = _dry_run("llama-tiny", "--tp", 2, "--pp", 2, "--dry-run-rank", rank)
        assert out["world_size"] == 4 and out["rank"] == rank
        pp_rank = rank // 2
        assert out["coordinates"]["tp_rank"] == rank % 2 and out["coordinates"]["pp_rank"] == pp_rank
        assert out["count"] == rank_params(cfg, Layout(tp=2, pp=2), pp_rank).total
        names = [p["name"] for p in out["parameters"]]
        assert ("embedding.word_embeddings.weight" in names) == (pp_rank == 0)
        assert ("output_layer.weight" in names) == (pp_rank == 1)
        assert all(n.startswith(f"decoder.layers.{pp_rank}.") for n in names if n.startswith("decoder.layers."))
        assert out["memory"]["profile"] == "mzoo-fp32" and out["memory"]["total_gb"] > 0


def test_dry_run_cp2_x_tp2_rank_coordinates_and_memory():
    """Rank order tp, cp, dp: rank 3 of CP2 x TP2 x DP2 is tp 1, cp 1, dp 0; every CP rank holds the
    whole model; the estimate is the planner's engine memory for that layout (gathered K/V included)."""
    from mzoo.plan.memory import memory
    from mzoo.plan.profile import engine_profile
    from mzoo.plan.settings import Settings

    cfg = get("llama3-8b").config
    out = _dry_run("llama3-8b", "--cp", 2, "--tp", 2, "--dp", 2, "--sequence-parallel", "--seq-len", 8192,
                   "--micro-batch", 1, "--global-batch", 8, "--precision", "bf16", "--dry-run-rank", 3)
    assert out["world_size"] == 8 and out["layout"]["cp"] == 2
    assert (out["coordinates"]["tp_rank"], out["coordinates"]["cp_rank"], out["coordinates"]["dp_rank"]) == (1, 1, 0)
    assert out["count"] == rank_params(cfg, Layout(tp=2, cp=2, dp=2), 0).total
    layout = Layout(tp=2, cp=2, dp=2, sequence_parallel=True)
    expected = memory(cfg, layout, Settings(8192, 8, 1, distributed_optimizer=False), engine_profile("bf16", True))
    assert out["memory"]["total_gb"] == round(expected.total / 2**30, 3)
    assert out["memory"]["activations_gb"] > 5  # 4096 tokens per rank of 32 layers: the estimate is not empty


def test_dry_run_deepseek_v3_at_full_scale_in_seconds():
    """Rank 0 and a last-stage rank of TP2 x PP16 x EP64 x DP64 (2048 processes) on the meta device."""
    cfg = get("deepseek-v3").config
    layout = Layout(tp=2, pp=16, dp=64, ep=64, first_stage_layers=4, last_stage_layers=1)
    args = ["deepseek-v3", "--tp", 2, "--pp", 16, "--ep", 64, "--dp", 64, "--first-stage-layers", 4,
            "--last-stage-layers", 1, "--seq-len", 4096, "--micro-batch", 1, "--global-batch", 128,
            "--sequence-parallel", "--distributed-optimizer", "--precision", "bf16", "--recompute", "full"]
    start = time.perf_counter()
    first = _dry_run(*args)
    last_rank = 15 * 128 + 2 * 63 + 1  # pp 15, dp 63 (ep rank 63), tp 1
    last = _dry_run(*args, "--dry-run-rank", last_rank)
    assert time.perf_counter() - start < 30
    assert first["world_size"] == 2048 and first["layers"] == [0, 1, 2, 3] and last["layers"] == [60]
    assert first["count"] == rank_params(cfg, layout, 0).total
    assert last["count"] == rank_params(cfg, layout, 15).total
    assert last["coordinates"]["ep_rank"] == 63
    experts = {p["name"] for p in last["parameters"] if ".local_experts." in p["name"]}
    assert "decoder.layers.60.mlp.experts.local_experts.252.linear_fc1.weight" in experts  # 63 * 256/64 + 0
    assert last["memory"]["profile"] == "mzoo-bf16"


def test_dry_run_qwen3_235b_a22b_last_stage_rank():
    """Qwen3-MoE's blocks (q/k norms, head_dim 128, 128 routed experts, no shared ones) on a last-stage
    rank of TP4 x PP4 x EP16 x DP16 (uneven stages): the exact count and the planner's memory."""
    from mzoo.plan.costs import as_model, stages
    from mzoo.plan.memory import stage_memory
    from mzoo.plan.profile import engine_profile
    from mzoo.plan.settings import Settings

    cfg = get("qwen3-235b-a22b").config
    layout = Layout(tp=4, pp=4, dp=16, ep=16, first_stage_layers=22, last_stage_layers=22, sequence_parallel=True)
    rank = 3 * 64 + 4 * 15 + 3  # pp 3, dp 15 (ep rank 15), tp 3
    out = _dry_run("qwen3-235b-a22b", "--tp", 4, "--pp", 4, "--ep", 16, "--dp", 16, "--first-stage-layers", 22,
                   "--last-stage-layers", 22, "--seq-len", 4096, "--micro-batch", 1, "--global-batch", 64,
                   "--sequence-parallel", "--precision", "bf16", "--dry-run-rank", rank)
    assert out["layers"] == list(range(72, 94)) and out["coordinates"]["ep_rank"] == 15
    assert out["count"] == rank_params(cfg, layout, 3).total
    names = {p["name"] for p in out["parameters"]}
    assert "decoder.layers.93.self_attention.q_layernorm.weight" in names
    assert "decoder.layers.93.mlp.experts.local_experts.120.linear_fc1.weight" in names  # 15 * 128/16 + 0
    expected = stage_memory(as_model(cfg), layout, Settings(4096, 64, 1, distributed_optimizer=False),
                            engine_profile("bf16", True), stages(cfg, layout)[3])  # this rank's stage
    assert out["memory"]["total_gb"] == round(expected.total / 2**30, 3)


def test_dry_run_bad_rank_and_bad_layout_fail_before_work():
    r = mzoo("train", "llama-tiny", "--tp", 2, "--mock-data", "--dry-run", "--dry-run-rank", 2)
    assert r.returncode == 2 and "outside the 2 ranks" in r.stderr
    r = mzoo("train", "llama-tiny", "--tp", 3, "--mock-data", "--dry-run")
    assert r.returncode == 2 and "does not divide the 2 query groups" in r.stderr
