"""Issue 17, case 11: a destination that will not fit is refused before any work, in one sentence with
needed vs free. MZOO_FREE_BYTES (a documented test hook) stands in for a nearly full disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mzoo.ckpt.atomic import DiskFullError
from mzoo.data.prepare import PrepareConfig, prepare

MZOO = str(Path(sys.executable).with_name("mzoo"))


def test_init_refuses_an_output_that_will_not_fit(tmp_path: Path) -> None:
    env = {**os.environ, "MZOO_FREE_BYTES": str(1 << 20)}
    out = subprocess.run([MZOO, "init", "llama-tiny", str(tmp_path / "m")], env=env, capture_output=True, text=True,
                         timeout=120)
    err = " ".join(out.stderr.split())
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "needs about" in err and "1.0 MiB free" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_data_prepare_refuses_an_output_that_will_not_fit(tmp_path: Path, monkeypatch) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "%s"}\n' % ("word " * 20000) * 1000)  # about 100 MB of text
    monkeypatch.setenv("MZOO_FREE_BYTES", str(10 << 20))
    with pytest.raises(DiskFullError, match=r"needs about .* but .* has 10.0 MiB free"):
        prepare(PrepareConfig(inputs=[corpus], tokenizer=tmp_path / "no-tokenizer", out=str(tmp_path / "d")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
