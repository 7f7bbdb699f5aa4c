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
        iteration = read_tracker(root / TRACKER)
        folder = iteration_dir(root, iteration)
        if not folder.is_dir():
            raise CheckpointError(f"{root / TRACKER} points at {folder.name}, which does not exist; the copy is incomplete.")
        return folder, iteration
    match = re.fullmatch(r"iter_(\d{7})", root.name)
    if match or root.name == "release":
        return root, int(match.group(1)) if match else "release"
    raise CheckpointError(f"{root} has no {TRACKER} and is not an iter_XXXXXXX folder; it is not a Megatron checkpoint.")


def read_tracker(path: Path) -> int | str:
    """The iteration a tracker file names; anything else (garbage, empty, binary) is one sentence."""
    fix = "write the iteration number (or 'release') into it, or pass the iter_XXXXXXX folder itself."
    with open(path, "rb") as f:
        data = f.read(4096)  # a tracker is a few bytes; a huge file is not one
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not text (a damaged copy?); {fix}") from None
    if not text:
        raise CheckpointError(f"{path} is empty; {fix}")
    if text == "release":
        return text
    if not re.fullmatch(r"\d{1,12}", text):
        shown = text if len(text) <= 40 and text.isprintable() else text[:40].encode("unicode_escape").decode() + "..."
        raise CheckpointError(f"{path} holds {shown!r}, not an iteration number or 'release'; {fix}")
    return int(text)


def write_tracker(root: Path, iteration: int | str) -> None:
    text = f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n"
    atomic_write_bytes(root / TRACKER, text.encode())

