"""mzoo.ckpt.atomic, the one output mechanism of every writer (issue 17, cases 5, 6, 8, 11, 15).

Kills are real (SIGKILL of a real process at a named window, via MZOO_FAULT): a random kill would
reach the instant between two renames only rarely."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mzoo.ckpt import atomic
from mzoo.ckpt.atomic import DiskFullError, OutputError, atomic_dir

WRITE = r'''
import sys
from pathlib import Path
from mzoo.ckpt.atomic import atomic_dir
dst, text, overwrite = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
with atomic_dir(dst, overwrite) as tmp:
    (tmp / "a.txt").write_text(text)
    (tmp / "b.txt").write_text(text)
'''


def write_in_process(dst: Path, text: str, overwrite: bool, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, atomic.FAULT_ENV: fault}
    return subprocess.run([sys.executable, "-c", WRITE, str(dst), text, "1" if overwrite else "0"], env=env,
                          capture_output=True, text=True, timeout=60)


def content(dst: Path) -> set[str]:
    """The texts a folder written by WRITE holds: one value when complete."""
    return {(dst / n).read_text() for n in ("a.txt", "b.txt")}


def test_a_folder_created_at_dst_meanwhile_is_never_replaced(tmp_path):  # case 5
    dst = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        with atomic_dir(dst) as tmp:
            (tmp / "a.txt").write_text("new")
            dst.mkdir()
            (dst / "precious").write_text("keep")
    assert (dst / "precious").read_text() == "keep" and sorted(p.name for p in dst.iterdir()) == ["precious"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_of_two_concurrent_writers_one_fails_with_a_sentence(tmp_path):  # case 5
    dst = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while"):
        with atomic_dir(dst) as first:
            with atomic_dir(dst) as second:
                (second / "a.txt").write_text("second")
            (first / "a.txt").write_text("first")
    assert (dst / "a.txt").read_text() == "second"


@pytest.mark.parametrize("window, expect", [("before-switch", "old"), ("after-exchange", "new")])
def test_overwrite_killed_at_each_window_leaves_one_complete_copy(tmp_path, window, expect):  # case 6
    dst = tmp_path / "out"
    assert write_in_process(dst, "old", False).returncode == 0
    killed = write_in_process(dst, "new", True, window)
    assert killed.returncode == -9, killed.stderr
    assert content(dst) == {expect}  # never missing, never mixed
    left = atomic.leftovers(dst)
    assert len(left) == 1 and ".mzoo-tmp-" in left[0].name  # the other copy, under a hidden name
    again = write_in_process(dst, "third", True)
    assert again.returncode == 0, again.stderr
    assert "removed 1 temporary" in again.stderr and left[0].name in again.stderr  # cleaned, and said
    assert content(dst) == {"third"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_exchange_fallback_is_killable_only_with_the_old_copy_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "a.txt").write_text("old")
    with atomic_dir(dst, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (dst / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_writers_temporary_is_not_swept(tmp_path):  # case 8
    dst = tmp_path / "out"
    tmp, fd = atomic.new_temp_dir(dst)
    try:
        assert atomic.leftovers(dst) == [] and atomic.sweep(dst) == [] and tmp.exists()
    finally:
        os.close(fd)
    assert atomic.leftovers(dst) == [tmp]
    assert atomic.sweep(dst) == [tmp] and not tmp.exists()


def test_a_killed_first_write_leaves_a_temporary_the_next_run_removes_and_mentions(tmp_path):  # case 8
    dst = tmp_path / "out"
    assert write_in_process(dst, "x", False, "before-switch").returncode == -9
    assert not dst.exists() and len(atomic.leftovers(dst)) == 1
    again = write_in_process(dst, "y", False)
    assert again.returncode == 0 and "removed 1 temporary" in again.stderr
    assert content(dst) == {"y"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_honour_the_umask(tmp_path):  # case 15
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            fd = os.open(tmp / "sub" / "opt.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors-like writers do
            os.close(fd)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert (out.stat().st_mode & 0o777, (out / "sub").stat().st_mode & 0o777,
            (out / "sub" / "opt.bin").stat().st_mode & 0o777) == (0o755, 0o755, 0o644)


def test_a_full_disk_mid_write_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):  # case 11
    monkeypatch.setenv(atomic.FAULT_ENV, "before-switch:enospc")
    with pytest.raises(DiskFullError, match="the disk filled while writing .* nothing was left behind"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_what_will_not_fit_is_refused_before_any_work(tmp_path):  # case 11
    free = atomic.free_bytes(tmp_path)
    with pytest.raises(DiskFullError, match="needs about .* free; free some space or write elsewhere"):
        atomic.check_destination(tmp_path / "out", need_bytes=free + 1)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path):  # case 7
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        atomic.check_destination(tmp_path / "file" / "out")
    with pytest.raises(OutputError, match="already exists .a file."):
        atomic.check_destination(tmp_path / "file")


def test_overwrite_onto_a_symlink_replaces_the_link_and_keeps_its_target(tmp_path):  # case 14
    """--overwrite replaces DST, which is the link: the folder it points at is not the user's to lose."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    (tmp_path / "dst").symlink_to(target)
    with atomic_dir(tmp_path / "dst", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    dst = tmp_path / "dst"
    assert not dst.is_symlink() and (dst / "a.txt").read_text() == "new"
    assert (target / "precious").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "elsewhere"]
