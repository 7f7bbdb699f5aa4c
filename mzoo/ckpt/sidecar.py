"""`mzoo.yaml`: the small sidecar that says what a checkpoint is, written next to every checkpoint.

Other tools ignore it; mzoo reads it to learn the resolved config, layout, true vocabulary size
and dtype without guessing, and every file's size and CRC-32 to detect truncation and corruption
(`mzoo inspect --check`). CRC-32 rather than a cryptographic hash: it guards against bad disks and
copies, not adversaries, and costs a third of SHA-256 here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

import mzoo
from mzoo.ckpt.atomic import atomic_write_bytes
from mzoo.ckpt.megatron.tracker import TRACKER
from mzoo.ckpt.runlock import LOCK_NAME
from mzoo.ckpt.sink import crc32, known_crc
from mzoo.config import ModelConfig
from mzoo.layout import Layout

SIDECAR = "mzoo.yaml"


def write_sidecar(
    folder: Path,
    cfg: ModelConfig,
    fmt: str,
    dtype: str,
    layout: Optional[Layout] = None,
    extra: Optional[dict[str, Any]] = None,
    skip: str = "",
    rehash: str = "",
) -> None:
    """`skip`: a subfolder not to vouch for (yet); `rehash`: one whose files were replaced in place, so
    the checksums recorded earlier for it are not reused."""
    folder = Path(folder)
    # the tracker moves after the sidecar is written, temporary names are renamed away and the run
    # lock is rewritten by each run that takes it: none is part of what the sidecar vouches for
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (SIDECAR, TRACKER, LOCK_NAME)
        and ".mzoo-tmp" not in str(p.relative_to(folder))
        and not (skip and str(p.relative_to(folder)).startswith(skip + "/"))
    }
    previous = read_sidecar(folder) or {}
    known, sizes = previous.get("crc32") or {}, previous.get("files") or {}
    if rehash:
        known = {rel: crc for rel, crc in known.items() if not rel.startswith(rehash + "/")}
    # files of earlier iterations are immutable once renamed into place, and files this process
    # wrote through a FileSink were hashed on the way out: read back only the rest
    checksums = {rel: known[rel] if rel in known and sizes.get(rel) == size else _crc32_written(folder / rel)
                 for rel, size in files.items()}
    layout = layout or Layout()
    data = {
        "mzoo_version": mzoo.__version__,
        "format": fmt,
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "layout": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "ep": layout.ep},
        "model": cfg.to_dict(),
        "files": files,
        "crc32": checksums,
        **(extra or {}),
    }
    atomic_write_bytes(folder / SIDECAR, yaml.safe_dump(data, sort_keys=False).encode())


def crc32_file(path: Path, block: int = 8 << 20) -> str:
    """Reads the file (what `inspect --check` trusts); `_crc32_written` may use the writer's."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = crc32(chunk, crc)
    return f"{crc:08x}"


def _crc32_written(path: Path) -> str:
    crc = known_crc(path)
    return crc32_file(path) if crc is None else f"{crc:08x}"


def read_sidecar(folder: Path) -> Optional[dict[str, Any]]:
    path = Path(folder) / SIDECAR
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else None
