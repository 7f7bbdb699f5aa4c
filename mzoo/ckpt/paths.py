"""One rule for every file a reader takes from the folder it was given: it must stay inside that
folder once symlinks are resolved (so a link cannot carry a private key into a conversion or an
upload), except in a Hugging Face hub cache, where `models--org--name/snapshots/<rev>/file` links
to `../../blobs/<sha>`: there a link may reach that repository's own `blobs/`, nothing else."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from mzoo.ckpt.hf import CheckpointError

_REPO = re.compile(r"(models|datasets|spaces)--.+")


def hub_blobs(folder: Path) -> Optional[Path]:
    """The `blobs/` folder of the hub cache repository whose snapshot `folder` is, if it is one."""
    folder = Path(folder).resolve()
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and _REPO.fullmatch(repo.name) and (repo / "blobs").is_dir():
        return repo / "blobs"
    return None


def hub_snapshot(path: Path) -> Path:
    """A `models--org--name` cache folder stands for the snapshot its refs/main names; any other path
    is itself."""
    path = Path(path)
    ref = path / "refs" / "main"
    if not (_REPO.fullmatch(path.name) and (path / "snapshots").is_dir() and ref.is_file()):
        return path
    rev = ref.read_text().strip()
    snap = path / "snapshots" / rev
    if not re.fullmatch(r"[0-9a-f]{6,64}", rev) or not snap.is_dir():
        raise CheckpointError(f"{ref} names revision {rev[:64]!r}, which {path / 'snapshots'} does not hold; "
                              "pass the snapshot folder itself or download the model again.")
    return snap


def inside(folder: Path, path: Path) -> Path:
    """`path` (within `folder`), refused in one sentence when symlinks take it out of the folder."""
    folder, path = Path(folder), Path(path)
    try:
        root, full = folder.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{path} cannot be resolved ({type(e).__name__}); remove the broken link.") from None
    if root in full.parents:
        return path
    blobs = hub_blobs(folder)
    if blobs is not None and full.parent == blobs:
        return path
    raise CheckpointError(f"{path} points outside {folder} (to {full}); refusing to read it: copy the file into "
                          "the folder if it belongs there.")
