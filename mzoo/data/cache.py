"""The index cache: .npy files next to the data, named by a hash of what determines them, so a
second run (or another rank) maps the indices instead of rebuilding them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

CACHE_FORMAT = "mzoo-gpt-indices-1"


def default_cache_dir(prefix: str) -> Path:
    return Path(f"{prefix}.cache")


def _description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode(), usedforsecurity=False).hexdigest()


def _save_npy_atomically(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".mzoo-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_indices(cache_dir: Optional[Path], name: str, description: dict, kinds: Sequence[str],
                   build: Callable[[], Sequence[np.ndarray]]) -> tuple[list[np.ndarray], bool]:
    """Load `kinds` arrays from `cache_dir/<name>-<hash>-<kind>.npy`, or build and save them.

    Each file is written atomically and the description file last, so a present description means a
    complete, matching set (ranks that race to build write identical files). Returns (arrays, hit).
    An unwritable cache folder only costs the rebuild next time."""
    if cache_dir is None:
        return list(build()), False
    base = f"{name}-{_description_hash(description)}"
    paths = [cache_dir / f"{base}-{k}.npy" for k in kinds]
    desc_path = cache_dir / f"{base}-description.json"
    if desc_path.exists() and all(p.exists() for p in paths):
        return [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths], True
    arrays = list(build())
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for p, a in zip(paths, arrays):
            _save_npy_atomically(p, a)
        fd, tmp = tempfile.mkstemp(prefix=desc_path.name + ".", suffix=".mzoo-tmp", dir=cache_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, desc_path)
    except OSError as e:
        warnings.warn(f"could not cache dataset indices in {cache_dir} ({e}); they will be rebuilt next time")
    return arrays, False
