"""`mzoo.yaml`: the small sidecar that says what a checkpoint is, written next to every checkpoint.

Other tools ignore it; mzoo reads it to learn the resolved config, layout, true vocabulary size
and dtype without guessing, and the file sizes to detect truncation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

import mzoo
from mzoo.ckpt.atomic import atomic_write_bytes
from mzoo.config import ModelConfig, ParallelConfig

SIDECAR = "mzoo.yaml"


def write_sidecar(
    folder: Path,
    cfg: ModelConfig,
    fmt: str,
    dtype: str,
    layout: Optional[ParallelConfig] = None,
    extra: Optional[dict[str, Any]] = None,
) -> None:
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SIDECAR
    }
    layout = layout or ParallelConfig()
    data = {
        "mzoo_version": mzoo.__version__,
        "format": fmt,
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "layout": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "ep": layout.ep},
        "model": cfg.to_dict(),
        "files": files,
        **(extra or {}),
    }
    atomic_write_bytes(folder / SIDECAR, yaml.safe_dump(data, sort_keys=False).encode())


def read_sidecar(folder: Path) -> Optional[dict[str, Any]]:
    path = Path(folder) / SIDECAR
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else None
