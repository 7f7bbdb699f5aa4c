"""Issue 17, case 6: `data prepare --overwrite` switches .bin and .idx as one pair. A kill between the
two renames (MZOO_FAULT=data-between-renames) is one of tests/cli/test_crash_safety.py's fault-window
trials (the reader and `train --data` refuse the pair in one sentence; the next prepare repairs it);
here: a .bin from another pair is refused even without the marker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mzoo.data.errors import DataError
from mzoo.data.indexed import IndexedDataset, bin_path

WRITE = """
import sys, numpy as np
from mzoo.data.indexed import IndexedDatasetWriter
with IndexedDatasetWriter(sys.argv[1], np.uint16) as w:
    for _ in range(int(sys.argv[2])):
        w.add_document(np.arange(20) % 1000)
"""


def write(prefix: Path, documents: int) -> int:
    return subprocess.run([sys.executable, "-c", WRITE, str(prefix), str(documents)]).returncode


def test_a_bin_from_another_pair_is_refused_even_without_the_marker(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert write(a, 500) == 0 and write(b, 800) == 0
    bin_path(a).write_bytes(bin_path(b).read_bytes())  # copied separately
    with pytest.raises(DataError, match="are not one pair"):
        IndexedDataset(a)
