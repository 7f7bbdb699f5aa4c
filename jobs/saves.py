"""Where a training run saves: `--save` checked before any work (writable, replacing nothing it
was not asked to, room for the first save). Shared by `mzoo train` and `mzoo finetune`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from mzoo.ckpt.atomic import check_destination, check_space
from mzoo.ckpt.megatron.tracker import TRACKER
from mzoo.ckpt.runlock import LOCK_NAME
from mzoo.config import ModelConfig
from mzoo.errors import UserError
from mzoo.params import count_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _iterations(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("iter_[0-9]*") if p.is_dir() and p.name[5:].isdigit())


def _written_iterations(start: int, steps: int, interval: int) -> set[int]:
    """The iterations a run from `start` to `steps` saves: every `interval`, and the last."""
    if steps <= start:  # nothing to train: nothing is written
        return set()
    return {s for s in range(start + 1, steps) if interval and s % interval == 0} | {steps}


def check_save(save: Optional[Path], overwrite: bool, hf: bool, steps: int, interval: int,
               load: Optional[str] = None) -> None:
    """Before any work: `--save` can be written, and replaces nothing it was not asked to. An HF save
    replaces the whole folder, so a non-empty one needs --overwrite; a Megatron root gains iterations,
    but one that holds another run's iteration this run would write (or is not a checkpoint) needs it too."""
    if save is None:
        return
    save = Path(save)
    check_destination(save, overwrite=True)  # parent exists, writable
    if not save.exists():
        return
    if not save.is_dir():
        raise UserError(f"--save {save} is a file, not a folder; choose a folder (it is created if missing).")
    if not os.access(save, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --save {save} (no permission, or a read-only file system); "
                        f"choose a writable folder.")
    if overwrite or not any(p.name != LOCK_NAME for p in save.iterdir()):
        return
    if hf:
        raise UserError(f"--save {save} already holds files, which an HF save would replace; choose a new or "
                        f"empty folder, or pass --overwrite to replace it.")
    if not (save / TRACKER).exists() and not _iterations(save):
        raise UserError(f"--save {save} holds files but is no checkpoint root; choose a new or empty folder, or "
                        f"pass --overwrite to add iterations to it anyway.")
    start = 0
    if load is not None and (save / TRACKER).exists() and Path(load).resolve() in (save.resolve(),
                                                                                    save.resolve().parent):
        start = max(_iterations(save), default=0)
    clash = sorted(set(_iterations(save)) & _written_iterations(start, steps, interval))
    if clash:
        raise UserError(f"--save {save} already holds iteration {clash[0]} from another run, which this run would "
                        f"replace; save elsewhere, resume it with --load {save}, or pass --overwrite.")


def save_bytes(cfg: ModelConfig, precision: str, hf: bool) -> int:
    """What one save writes: the weights at the run's precision and, in a Megatron save, the optimizer
    state beside them (Adam's fp32 master weights, exp_avg and exp_avg_sq: 12 bytes a parameter)."""
    return count_params(cfg).total * (DTYPES[precision].itemsize + (0 if hf else 12))


def first_save(start: int, steps: int, interval: int) -> int:
    """The iteration a run from `start` saves first: the next multiple of `interval`, else the last step."""
    nxt = (start // interval + 1) * interval if interval else steps
    return min(nxt, steps)


def check_save_space(save: Optional[Path], cfg: ModelConfig, precision: str, hf: bool, first: int) -> None:
    """Before step 1: the first save (iteration `first`) fits, so a full disk is not found out only
    after the work it was to keep."""
    if save is None:
        return
    save = Path(save)
    what = f"saving the finetuned model (hf) at step {first} to {save}" if hf else \
        f"saving iteration {first} (weights and optimizer state) to {save}"
    check_space(save if save.is_dir() else save.absolute().parent, save_bytes(cfg, precision, hf), what)
