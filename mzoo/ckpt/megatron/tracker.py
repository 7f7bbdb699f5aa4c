"""The tracker file and iteration folders of a Megatron checkpoint root."""

from __future__ import annotations

import re
from pathlib import Path

from mzoo.ckpt.atomic import atomic_write_bytes
from mzoo.ckpt.hf import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"

def iteration_dir(root: Path, iteration: int | str) -> Path:
    return root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def find_iteration_dir(root: Path) -> tuple[Path, int | str]:
    """The folder the tracker points at (or `root` itself when given an iteration folder)."""
    root = Path(root)
    if (root / TRACKER).exists():
        text = (root / TRACKER).read_text().strip()
        iteration: int | str = "release" if text == "release" else int(text)
        folder = iteration_dir(root, iteration)
        if not folder.is_dir():
            raise CheckpointError(f"{root / TRACKER} points at {folder.name}, which does not exist; the copy is incomplete.")
        return folder, iteration
    match = re.fullmatch(r"iter_(\d{7})", root.name)
    if match or root.name == "release":
        return root, int(match.group(1)) if match else "release"
    raise CheckpointError(f"{root} has no {TRACKER} and is not an iter_XXXXXXX folder; it is not a Megatron checkpoint.")


def write_tracker(root: Path, iteration: int | str) -> None:
    text = f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n"
    atomic_write_bytes(root / TRACKER, text.encode())

