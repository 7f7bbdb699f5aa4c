"""Issue 17, cases 8 and 9: signals and hangs, with real processes (2-process gloo runs under the
`mzoo` parent that relaunches itself under torchrun, real SIGTERM / SIGINT / SIGSTOP / SIGKILL).

Each test waits for the run to be training (its step lines), then signals the parent, the workers'
group or one worker, and checks what the user gets: the exit code, one sentence, a saved iteration
that resumes, and no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MZOO = str(Path(sys.executable).with_name("mzoo"))
TRAIN = ["train", "llama-tiny", "--mock-data", "--tp", "2", "--seq-len", "32", "--steps", "100000",
         "--lr", "1e-3", "--warmup", "1"]


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for kid in kids.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def workers(pid: int) -> list[int]:
    """The training processes under the parent (torchrun's children running mzoo.cli.main)."""
    found = []
    for kid in children(pid):
        try:
            cmd = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mzoo.cli.main" in cmd and b"torch.distributed.run" not in cmd:
            found.append(kid)
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    """The parent in its own session (a terminal's job, or a batch script's), stderr to a file."""
    err = open(tmp_path / "stderr.txt", "w")
    return subprocess.Popen([MZOO, *TRAIN, *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True,
                            start_new_session=True)


def wait_training(proc: subprocess.Popen, tmp_path: Path, steps: int = 3, timeout: float = 240) -> None:
    """Until the workers have logged `steps` steps (a JSON log line each)."""
    log = tmp_path / "log.jsonl"
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.3)
    raise AssertionError("the run never started training: " + (tmp_path / "stderr.txt").read_text()[-3000:])


def outcome(proc: subprocess.Popen, tmp_path: Path, timeout: float = 120) -> tuple[int, str]:
    """Exit code and stderr; every process under the parent is killed if it does not end in time."""
    kids = children(proc.pid)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in kids + children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
        raise AssertionError("the parent did not end: " + (tmp_path / "stderr.txt").read_text()[-3000:])
    return proc.returncode, (tmp_path / "stderr.txt").read_text()


def saved_iteration(root: Path) -> int:
    return int((root / "latest_checkpointed_iteration.txt").read_text().strip())


def assert_none_left(pids: list[int]) -> None:
    end = time.time() + 30
    while time.time() < end and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes left training: {left}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_parent_saves_and_exits_128_plus_signal(tmp_path, sig):
    """`kill PID` / `timeout` / Ctrl-C reach the parent: it forwards to the workers, which agree on
    one step, save it, and stop; the parent exits 128+signal with the sentence; the save resumes."""
    proc = start(tmp_path, "--save", "ckpt", "--log-json", "log.jsonl")
    wait_training(proc, tmp_path)
    pids = workers(proc.pid)
    assert len(pids) == 2
    os.kill(proc.pid, sig)
    code, err = outcome(proc, tmp_path)
    assert code == 128 + sig, err[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    step = saved_iteration(tmp_path / "ckpt")
    assert step == steps[-1]
    name = signal.Signals(sig).name
    assert f"stopped by {name} at step {step}; saved iteration {step} to ckpt; resume with --load ckpt" in err, err
    assert "Traceback" not in err, err
    assert_none_left(pids)
    # the saved iteration resumes where it stopped
    resumed = subprocess.run([MZOO, *TRAIN[:-6], "--steps", str(step + 1), "--load", "ckpt", "--json"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(json.loads(resumed.stdout)["losses"]) == 1


def test_sigterm_to_the_workers_group_saves(tmp_path):
    """Slurm signals every process of the job: the workers (and torchrun) get SIGTERM directly."""
    proc = start(tmp_path, "--save", "ckpt", "--log-json", "log.jsonl")
    wait_training(proc, tmp_path)
    pids = workers(proc.pid)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    code, err = outcome(proc, tmp_path)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    step = saved_iteration(tmp_path / "ckpt")
    assert f"stopped by SIGTERM at step {step}; saved iteration {step}" in err, err
    assert_none_left(pids)


def test_workers_stop_when_the_parent_dies(tmp_path):
    """A parent killed outright (SIGKILL, OOM killer) leaves no training behind: the workers save and end."""
    proc = start(tmp_path, "--save", "ckpt", "--log-json", "log.jsonl")
    wait_training(proc, tmp_path)
    pids = workers(proc.pid)
    everyone = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_none_left(everyone)
    assert saved_iteration(tmp_path / "ckpt") >= 3
    assert pids


def test_watchdog_ends_a_job_whose_rank_is_frozen(tmp_path):
    """SIGSTOP on one rank: the job ends with exit 124 after the watchdog's limit, naming that rank."""
    proc = start(tmp_path, "--log-json", "log.jsonl", "--watchdog", "10")
    wait_training(proc, tmp_path)
    pids = workers(proc.pid)
    everyone = children(proc.pid)
    os.kill(pids[1], signal.SIGSTOP)  # the second worker started: rank 1 (checked in the message)
    rank = int(dict(line.split("=", 1) for line in
                    Path(f"/proc/{pids[1]}/environ").read_bytes().decode().split("\0") if "=" in line)["RANK"])
    began = time.time()
    code, err = outcome(proc, tmp_path, timeout=90)
    assert code == 124, err[-3000:]
    # the limit counts from the rank's last progress, which came up to one step (and a poll) before SIGSTOP
    assert 8 <= time.time() - began < 60
    assert f"rank {rank} " in err and "--watchdog" in err, err
    assert "Traceback" not in err, err
    assert_none_left(everyone)


def test_bad_watchdog_value_is_one_sentence(tmp_path):
    out = subprocess.run([MZOO, *TRAIN, "--watchdog", "-1"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--watchdog" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_sigterm_during_a_conversion_removes_its_temporary_folder(tmp_path):
    """Any long command: SIGTERM unwinds like an error (temporaries removed), one sentence, 128+15.
    The process is frozen (SIGSTOP) the moment its temporary folder is seen, so the signal lands
    mid-write on every try, then SIGTERM and SIGCONT."""
    from conftest import make_hf_model
    from transformers import LlamaConfig

    src = make_hf_model(tmp_path / "hf", LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688,
                                                     num_hidden_layers=8, num_attention_heads=4,
                                                     num_key_value_heads=2, max_position_embeddings=128))
    for attempt in range(5):
        dst = tmp_path / f"out{attempt}"
        err = open(tmp_path / "stderr.txt", "w")
        proc = subprocess.Popen([MZOO, "convert", "hf->megatron", str(src), str(dst), "--tp", "2",
                                 "--megatron-format", "torch"], stderr=err, stdout=subprocess.DEVNULL)
        caught = False
        while proc.poll() is None:
            if any(".mzoo-tmp" in p.name for p in tmp_path.iterdir()):
                os.kill(proc.pid, signal.SIGSTOP)
                caught = any(".mzoo-tmp" in p.name for p in tmp_path.iterdir())
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)
                break
            time.sleep(0.002)
        proc.wait(timeout=120)
        if caught:
            break
    assert caught, "the temporary folder was never seen"
    text = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM before the command finished" in text and "Traceback" not in text, text
    assert not [p.name for p in tmp_path.iterdir() if ".mzoo-tmp" in p.name]
    assert not dst.exists()


def test_sigterm_to_a_single_process_run_saves(tmp_path):
    """One process (no torchrun; also what each `srun` task is): it saves the step and exits 143."""
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([MZOO, "train", "llama-tiny", "--mock-data", "--seq-len", "32", "--steps", "100000",
                             "--save", "ckpt", "--log-json", "log.jsonl"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=err, text=True, start_new_session=True)
    wait_training(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, text = outcome(proc, tmp_path)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    step = saved_iteration(tmp_path / "ckpt")
    assert f"stopped by SIGTERM at step {step}; saved iteration {step} to ckpt; resume with --load ckpt." in text
    assert "Traceback" not in text, text
