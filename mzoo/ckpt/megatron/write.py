"""Writing Megatron checkpoints: a new folder (tracker + one iteration) atomically, or one more
iteration in an existing root as training saves do; mzoo.yaml beside, the tracker last."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from mzoo.ckpt import dist as dist_fmt
from mzoo.ckpt import legacy
from mzoo.ckpt.atomic import atomic_dir, fsync_tree
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
                   tick: Callable[[int], None], tokenizer_files: list[Path] = (),
                   extents: Optional[Callable[[str], Optional[TensorExtents]]] = None) -> None:
    """A new Megatron checkpoint folder (tracker + one iteration), atomically. `extents`: where a
    canonical tensor's bytes already are unchanged (torch_dist copies them in the kernel)."""
    with atomic_dir(dst, overwrite) as tmp:
        _write_iteration(iteration_dir(tmp, iteration), cfg, tensors, fetch, target, dtype, iteration, tick, extents)
        _finish_root(tmp, cfg, target, dtype, iteration)


def add_iteration(root: Path, cfg: ModelConfig, tensors: list[CanonicalTensor], fetch: Callable[[str], torch.Tensor],
                  target: Target, dtype: torch.dtype, iteration: int,
                  extra: Callable[[Path], None] = lambda folder: None) -> Path:
    """Add one iteration to a (possibly existing) checkpoint root, as training saves do: the
    iteration folder is built under a temporary name and renamed, the tracker is updated last."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = iteration_dir(root, iteration)
    tmp = root / f".{final.name}.mzoo-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_iteration(tmp, cfg, tensors, fetch, target, dtype, iteration, lambda n: None)
        extra(tmp)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _finish_root(root, cfg, target, dtype, iteration)
    return final


def _write_iteration(folder: Path, cfg: ModelConfig, tensors: list[CanonicalTensor],
                     fetch: Callable[[str], torch.Tensor], target: Target, dtype: torch.dtype,
                     iteration: int | str, tick: Callable[[int], None],
                     extents: Optional[Callable[[str], Optional[TensorExtents]]] = None) -> None:
    lay = replace(target.megatron, iteration=iteration)
    padded = lay.padded_vocab(cfg)
    args = config_to_args(cfg, lay, dtype)
    specs = {t.name: t.spec for t in tensors}
    if target.fmt == "torch":
        folder.mkdir()
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


def _finish_root(root: Path, cfg: ModelConfig, target: Target, dtype: torch.dtype, iteration: int | str) -> None:
    lay = target.megatron
    write_sidecar(root, cfg, target.fmt, str(dtype).replace("torch.", ""), lay.layout,
                  extra={"iteration": iteration, "spec": lay.spelling, "padded_vocab_size": lay.padded_vocab(cfg)})
    write_tracker(root, iteration)  # last: marks the checkpoint complete
