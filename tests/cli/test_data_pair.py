"""Issue 17, case 6: `data prepare --overwrite` switches .bin and .idx as one pair. Killed between the
two renames (fault injection: MZOO_FAULT=data-between-renames), the next reader, and `train --data`,
refuse in one sentence instead of pairing the new .bin with the old .idx; the next prepare repairs it
and removes the killed run's temporaries, saying so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mzoo.data.errors import DataError
from mzoo.data.indexed import IndexedDataset, IndexedDatasetWriter, bin_path, idx_path, pending_path
from mzoo.data.prepare import sweep_temporaries

MZOO = str(Path(sys.executable).with_name("mzoo"))
WRITE = """
import sys, numpy as np
from mzoo.data.indexed import IndexedDatasetWriter
with IndexedDatasetWriter(sys.argv[1], np.uint16) as w:
    for _ in range(int(sys.argv[2])):
        w.add_document(np.arange(20) % 1000)
"""


def write(prefix: Path, documents: int, fault: str = "") -> int:
    env = {**os.environ, "MZOO_FAULT": fault}
    return subprocess.run([sys.executable, "-c", WRITE, str(prefix), str(documents)], env=env).returncode


def test_killed_between_the_renames_the_pair_is_refused_then_repaired(tmp_path: Path) -> None:
    prefix = tmp_path / "corpus"
    assert write(prefix, 500) == 0
    old_idx = idx_path(prefix).read_bytes()
    assert write(prefix, 800, "data-between-renames") == -9  # killed with the new .bin in, the old .idx left
    assert idx_path(prefix).read_bytes() == old_idx and bin_path(prefix).stat().st_size == 800 * 20 * 2
    with pytest.raises(DataError, match="was being replaced when its writer stopped"):
        IndexedDataset(prefix)
    train = subprocess.run([MZOO, "train", "gpt-tiny", "--data", str(prefix), "--seq-len", "16", "--micro-batch",
                            "1", "--global-batch", "1", "--device", "cpu", "--steps", "1"],
                           capture_output=True, text=True, timeout=300)
    assert train.returncode != 0 and "Traceback" not in train.stderr, train.stderr[-2000:]
    assert "re-run `mzoo data prepare --overwrite`" in " ".join(train.stderr.split()), train.stderr
    leftover = [p for p in tmp_path.iterdir() if ".mzoo-tmp-" in p.name and p != pending_path(prefix)]
    assert leftover  # the killed run's temporary .idx
    assert sweep_temporaries(str(prefix)) == leftover
    assert write(prefix, 800) == 0
    assert len(IndexedDataset(prefix)) == 800 and not pending_path(prefix).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx"]


def test_a_bin_from_another_pair_is_refused_even_without_the_marker(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert write(a, 500) == 0 and write(b, 800) == 0
    bin_path(a).write_bytes(bin_path(b).read_bytes())  # copied separately
    with pytest.raises(DataError, match="are not one pair"):
        IndexedDataset(a)
