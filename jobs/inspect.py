"""`mzoo inspect`: what a checkpoint is, without loading its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mzoo.ckpt.atomic import leftovers_in
from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.integrity import archive_problems, deferred, is_finite, nonfinite_message
from mzoo.ckpt.megatron.tracker import find_iteration_dir
from mzoo.ckpt.sidecar import crc32_file, read_sidecar
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout
from mzoo.params import count_params


def describe(path: Path, trust_pickle: bool = False, vocab_size: Optional[int] = None,
             check: bool = False) -> dict[str, Any]:
    """What a checkpoint is, without loading its weights; files checked against mzoo.yaml's sizes
    and, with `check`, against its CRC-32 checksums (reads every byte)."""
    with deferred():  # the files are checked below, each problem listed
        src = open_source(path, trust_pickle, vocab_size)
    lay = src.megatron.layout if src.megatron is not None else Layout()
    root = path if src.fmt == "hf" or (path / "mzoo.yaml").exists() else path.parent
    side = read_sidecar(root) or {}
    problems = []
    recorded = side.get("files") or {}
    base = src.path if src.fmt == "hf" else root
    for rel, size in recorded.items():
        f = base / rel
        if not f.exists():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, mzoo.yaml recorded {size}")
        elif check and rel in (side.get("crc32") or {}) and crc32_file(f) != side["crc32"][rel]:
            problems.append(f"{rel} does not match the checksum mzoo.yaml recorded: it is corrupted")
    if check and not side.get("crc32") and src.fmt in ("torch", "torch_dist"):
        folder = find_iteration_dir(path)[0]
        problems += [p.replace(str(folder) + "/", "") for p in archive_problems(folder, src.fmt)]
    if check and not problems:  # every weight looked at once, in blocks (damaged files are reported above)
        for t in src.tensors:
            try:
                value = src.extents(t.name) if src.extents is not None else None
                if not is_finite(value if value is not None else src.get(t.name)):
                    problems.append(nonfinite_message(t.name, src.path, "it cannot be used as it is"))
            except CheckpointError as e:
                problems.append(str(e))
                break
    count = count_params(src.cfg)
    return {
        "path": str(path),
        "format": src.fmt,
        "iteration": src.iteration if src.fmt != "hf" else None,
        "tp": lay.tp,
        "pp": lay.pp,
        "vpp": lay.vpp,
        "ep": lay.ep,
        "spec": src.megatron.spelling if src.megatron is not None else None,
        "dtype": str(src.dtype).replace("torch.", ""),
        "quantization": src.quantization,  # "mxfp4": stored quantised, read (and counted) dequantised
        "num_params": count.total,
        "active_params": count.active,
        "vocab_size": src.cfg.vocab_size,
        "total_bytes": sum(src.files.values()),
        "files": src.files,
        "written_by_mzoo": bool(side),
        "problems": problems,
        "leftovers": [str(p) for p in leftovers_in(path)],  # killed writers' temporaries beside or inside it
        "checked": check and (bool(side.get("crc32")) or src.fmt in ("torch", "torch_dist")),
        "model": src.cfg.to_dict(),
    }
