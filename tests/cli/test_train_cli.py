"""`mzoo train` end to end: relaunch under torchrun on 2 gloo processes, start from a Hugging Face
checkpoint, save, convert the result back and verify it; bad layouts fail before any launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from informative import informative_init

from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.jobs.verify import verify_sources

MZOO = str(Path(sys.executable).with_name("mzoo"))


def run(*args, cwd):
    return subprocess.run([MZOO, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.dist
def test_train_tp2_from_hf_save_convert_verify(tmp_path):
    informative_init("llama-tiny", tmp_path / "hf")  # `mzoo init` with norms a lost one would show
    proc = run("train", "llama-tiny", "--tp", "2", "--steps", "4", "--seq-len", "32", "--lr", "3e-3", "--mock-data",
               "--load", "hf", "--save", "ck", "--log-json", "log.jsonl", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(logs[0])
    assert open_source(tmp_path / "ck").megatron.layout.tp == 2  # saved at the layout it trained at
    convert(open_source(tmp_path / "ck"), tmp_path / "back", Target("hf"))
    assert verify_sources(open_source(tmp_path / "ck"), open_source(tmp_path / "back")).max_abs_diff == 0.0
    hf, ck = open_source(tmp_path / "hf"), open_source(tmp_path / "ck")
    assert not verify_sources(hf, ck).match  # it trained
    for t in hf.tensors:  # and started from the norms it loaded: 4 steps at lr 3e-3 move them by < 0.05
        if len(t.shape) == 1:
            assert (ck.get(t.name) - hf.get(t.name)).abs().max() < 0.05, t.name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "2", "--dp", "2", "--nproc-per-node", "2"], "4 processes, but 2 were asked for"),
        (["--tp", "3"], "does not divide the 2 query groups"),
        (["--global-batch", "7"], "not a multiple of micro batch"),
        (["--override", "num_layers"], "is not key=value"),
        (["--load", "missing-dir"], "does not exist"),
        (["--pp", "3"], "exceeds the 2 layers"),
        (["--tp", "2", "--pp", "2", "--nproc-per-node", "2"], "4 processes, but 2 were asked for"),
        (["--data", "nowhere/corpus"], "nowhere/corpus"),
        ([], "no training data"),
        (["--overlap-param-gather"], "--overlap-param-gather overlaps the distributed optimizer's all-gather"),
        (["--cp", "2", "--seq-len", "30"], "--seq-len 30 is not divisible by 2 x cp = 4"),
        (["--cp", "2", "--dp", "1", "--nproc-per-node", "4"], "tp=1 x pp=1 x cp=2 x dp=1 = 2 processes, but 4"),
        (["--cp", "0"], "--cp"),
        (["--compile", "--recompute", "selective", "--override", "attention_dropout=0.1"],
         "--compile cannot recompute core attention with attention dropout (0.1)"),
    ],
)
def test_bad_training_input_fails_before_launch(tmp_path, args, message):
    extra = [] if ("--data" in args or args == []) else ["--mock-data"]
    proc = run("train", "llama-tiny", *args, *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.dist
def test_train_pp2_on_prepared_data_with_validation_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mzoo.train.bpe import CORPUS, corpus_texts, train_bpe

    tok = train_bpe(corpus_texts(), 1000, tmp_path / "tok")
    assert run("data", "prepare", CORPUS, "--tokenizer", tok, "--out", "corpus", "--append-eod", cwd=tmp_path).returncode == 0
    proc = run("train", "llama-tiny", "--pp", "2", "--data", "corpus", "--split", "90,10,0", "--tokenizer", tok,
               "--steps", "4", "--seq-len", "32", "--eval-interval", "2", "--tensorboard", "tb",
               "--log-json", "log.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [log["val_loss"] is not None for log in logs] == [False, True, False, True]
    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/loss"} <= set(board.Tags()["scalars"])
    assert [round(e.value, 5) for e in board.Scalars("train/loss")] == [round(log["loss"], 5) for log in logs]


@pytest.mark.dist
def test_compiled_pp2_run_reports_compile_and_trains_as_eager(tmp_path):
    """--compile through the torchrun relaunch, on two pipeline stages (each compiles its layer):
    the JSON says so, and the losses are eager's to the fp32 bound of tests/train/test_compile.py."""
    flags = ["--pp", "2", "--steps", "3", "--seq-len", "32", "--lr", "3e-3", "--mock-data", "--json"]
    eager, compiled = run("train", "llama-tiny", *flags, cwd=tmp_path), run("train", "llama-tiny", *flags,
                                                                              "--compile", cwd=tmp_path)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    eager, compiled = json.loads(eager.stdout), json.loads(compiled.stdout)
    assert compiled["layout"]["compile"] is True and eager["layout"]["compile"] is False
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=0, abs=5e-6)


def test_compile_refuses_moe_in_one_sentence(tmp_path):
    proc = run("train", "mixtral-tiny", "--compile", "--mock-data", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--compile supports attention, dense MLP and Mamba layers for now, not mixtral-tiny's" in proc.stderr


def test_tokenizer_that_does_not_fit_the_model(tmp_path):
    from mzoo.train.bpe import corpus_texts, train_bpe

    tok = train_bpe(corpus_texts(), 400, tmp_path / "tok")
    proc = run("train", "gpt-tiny", "--mock-data", "--tokenizer", tok, "--override", "vocab_size=300", cwd=tmp_path)
    assert proc.returncode == 2 and "vocab" in proc.stderr.lower() and "Traceback" not in proc.stderr


@pytest.mark.dist
def test_runs_inside_a_slurm_allocation(tmp_path):
    """Two tasks started the way `srun -n 2 mzoo train ...` starts them: no torchrun, ranks from SLURM."""
    import os

    from conftest import free_port

    env = {**os.environ, "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([MZOO, "train", "llama-tiny", "--mock-data", "--tp", "2", "--steps", "3", "--seq-len", "32",
                               "--json"], cwd=tmp_path, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    result = json.loads(outs[0][0])
    assert result["layout"]["tp"] == 2 and len(result["losses"]) == 3


@pytest.mark.dist
def test_overlapped_dp_run_logs_the_same_losses(tmp_path):
    """--overlap-grad-reduce --overlap-param-gather reach the workers and change no number."""
    common = ["train", "llama-tiny", "--dp", "2", "--distributed-optimizer", "--steps", "3", "--seq-len", "32",
              "--mock-data"]
    losses = []
    for name, flags in (("plain", []), ("overlap", ["--overlap-grad-reduce", "--overlap-param-gather"])):
        proc = run(*common, *flags, "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout)  # printed by rank 0 of the relaunched workers: what they ran with
        assert out["layout"]["dp"] == 2 and out["layout"]["distributed_optimizer"]
        assert out["layout"]["overlap_grad_reduce"] == out["layout"]["overlap_param_gather"] == bool(flags)
        losses.append(out["losses"])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
