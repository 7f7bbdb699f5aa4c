"""mzoo.ckpt.atomic, the one output mechanism of every writer (issue 17, cases 5, 6, 8, 11, 15).

Its named fault windows (MZOO_FAULT: a SIGKILL, or a full disk, exactly between two steps) are hit
through every writer command in tests/cli/test_crash_safety.py's fault-window trials; this file
checks the mechanism's other guarantees in-process."""

from __future__ import annotations

import os

import pytest

from mzoo.ckpt import atomic
from mzoo.ckpt.atomic import DiskFullError, OutputError, atomic_dir

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
