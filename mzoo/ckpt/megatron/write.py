"""Writing Megatron checkpoints: a new folder (tracker + one iteration) atomically, or one more
iteration in an existing root as training saves do; mzoo.yaml beside, the tracker last."""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from mzoo.ckpt import dist as dist_fmt
from mzoo.ckpt import legacy
from mzoo.ckpt.assets import TOKENIZER_DIR, Assets
from mzoo.ckpt.atomic import (OutputError, atomic_dir, disk_full, exchange, fault, fsync_tree, honour_umask_tree,
                               remove, rename_noreplace, sweep, try_lock)
from mzoo.ckpt.megatron.args import config_to_args
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.ckpt.megatron.keys import dist_chunks, dist_objects
from mzoo.ckpt.megatron.tracker import iteration_dir, write_tracker
from mzoo.ckpt.sidecar import write_sidecar
from mzoo.ckpt.sink import TensorExtents
from mzoo.config import ModelConfig
from mzoo.parallel.sharding import CanonicalTensor


def write_megatron(cfg: ModelConfig, tensors: list[CanonicalTensor], fetch: Callable[[str], torch.Tensor], dst: Path,
                   target: Target, dtype: torch.dtype, iteration: int | str, overwrite: bool,
                   tick: Callable[[int], None], assets: Assets = Assets(),
                   extents: Optional[Callable[[str], Optional[TensorExtents]]] = None) -> None:
    """A new Megatron checkpoint folder (tracker + one iteration), atomically. `extents`: where a
    canonical tensor's bytes already are unchanged (torch_dist copies them in the kernel); `assets`
    go to the iteration's tokenizer/ folder and mzoo.yaml."""
    with atomic_dir(dst, overwrite) as tmp:
        folder = iteration_dir(tmp, iteration)
        _write_iteration(folder, cfg, tensors, fetch, target, dtype, iteration, tick, extents, assets,
                         iteration_dir(Path(dst).absolute(), iteration))
        _finish_root(tmp, cfg, target, dtype, iteration, assets)


def add_iteration(root: Path, cfg: ModelConfig, tensors: list[CanonicalTensor], fetch: Callable[[str], torch.Tensor],
                  target: Target, dtype: torch.dtype, iteration: int,
                  extra: Callable[[Path], None] = lambda folder: None, assets: Assets = Assets()) -> Path:
    """Add one iteration to a (possibly existing) checkpoint root, as training saves do: the
    iteration folder is built under a locked temporary name, switched in (an existing one of the same
    number is exchanged, never deleted first), the tracker is updated, and only then the old copy removed:
    a kill at any moment leaves the tracker on a complete iteration."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = iteration_dir(root, iteration)
    tmp = root / f".{final.name}.mzoo-tmp"
    sweep(final)
    if tmp.exists():
        raise OutputError(f"another process is saving {final} now; stop it, or save this run elsewhere.")
    tmp.mkdir()
    lock = try_lock(tmp)
    replaced = final.exists()
    try:
        _write_iteration(tmp, cfg, tensors, fetch, target, dtype, iteration, lambda n: None, None, assets,
                         final.absolute())
        extra(tmp)
        honour_umask_tree(tmp)
        fsync_tree(tmp)
        if replaced:  # mzoo.yaml stops vouching for the old copy before it is swapped out
            _finish_root(root, cfg, target, dtype, iteration, assets, skip=final.name, tracker=False)
        fault("before-switch")
        (exchange if replaced else rename_noreplace)(tmp, final)
        fault("after-exchange" if replaced else "after-rename")
        _finish_root(root, cfg, target, dtype, iteration, assets, rehash=final.name if replaced else "")
        fault("after-tracker")
    except BaseException as e:  # before the switch tmp is the partial new copy, after it the old one
        remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise disk_full(final) from None
        raise
    finally:
        if lock is not None:
            os.close(lock)
    remove(tmp)  # the replaced copy, once the tracker is on the new one
    return final


def _write_iteration(folder: Path, cfg: ModelConfig, tensors: list[CanonicalTensor],
                     fetch: Callable[[str], torch.Tensor], target: Target, dtype: torch.dtype,
                     iteration: int | str, tick: Callable[[int], None],
                     extents: Optional[Callable[[str], Optional[TensorExtents]]] = None, assets: Assets = Assets(),
                     final: Optional[Path] = None) -> None:
    """One iteration folder; `final`: where it will be once renamed (args name its tokenizer there)."""
    lay = replace(target.megatron, iteration=iteration)
    padded = lay.padded_vocab(cfg)
    tokenizer = (final or folder) / TOKENIZER_DIR if assets.has_tokenizer else None
    args = config_to_args(cfg, lay, dtype, tokenizer)
    args.ckpt_format, args.use_dist_ckpt = target.fmt, target.fmt != "torch"
    specs = {t.name: t.spec for t in tensors}
    if assets.files:
        assets.copy_into(folder / TOKENIZER_DIR)
    if target.fmt == "torch":
        folder.mkdir(exist_ok=True)
        legacy.write_legacy(folder, [t.name for t in tensors], fetch, specs, lay, cfg.num_layers, args, padded,
                            cfg.tie_embeddings, tick, cfg.moe.num_experts if cfg.moe else 0, extents)
        return
    chunks = dist_chunks(cfg, tensors, fetch, lay.spelling, padded, dtype, extents)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration}
    if target.fmt == "torch_dist":
        dist_fmt.write_dist(folder, chunks, common, tick, dist_objects(cfg))
    else:
        from mzoo.ckpt import zarr as zarr_fmt

        zarr_fmt.write_checkpoint(folder, chunks, common, tick, dist_objects(cfg))


def _finish_root(root: Path, cfg: ModelConfig, target: Target, dtype: torch.dtype, iteration: int | str,
                 assets: Assets = Assets(), skip: str = "", rehash: str = "", tracker: bool = True) -> None:
    lay = target.megatron
    extra = {"iteration": iteration, "spec": lay.spelling, "padded_vocab_size": lay.padded_vocab(cfg)}
    if assets.special:
        extra["special_tokens"] = dict(assets.special)
    write_sidecar(root, cfg, target.fmt, str(dtype).replace("torch.", ""), lay.layout, extra=extra, skip=skip,
                  rehash=rehash)
    if tracker:
        write_tracker(root, iteration)  # last: marks the checkpoint complete
