"""What a Megatron target gets, from the config alone: files, keys, shapes and dtypes (`--plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mzoo.ckpt import legacy
from mzoo.ckpt.hf import storage_dtype
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target, validate_layout
from mzoo.ckpt.megatron.keys import dist_chunks
from mzoo.ckpt.megatron.tracker import iteration_dir
from mzoo.config import ModelConfig
from mzoo.parallel.sharding import CanonicalTensor, check_split


@dataclass(frozen=True)
class PlannedEntry:
    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class PlannedFile:
    """One file (legacy rank file, zarr array) or, for torch_dist, the DCP checkpoint as a whole."""

    path: str  # relative to the checkpoint root
    entries: list[PlannedEntry]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(e) for e in self.entries)


def _nbytes(e: PlannedEntry) -> int:
    return math.prod(e.shape) * getattr(torch, e.dtype).itemsize


@dataclass
class FilePlan:
    fmt: str
    megatron: MegatronCheckpoint
    files: list[PlannedFile]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        lay, par = self.megatron, self.megatron.layout
        return {"format": self.fmt, "tp": par.tp, "pp": par.pp, "vpp": par.vpp, "ep": par.ep, "spec": lay.spelling,
                "bytes": self.nbytes, "files": [{"path": f.path, "bytes": f.nbytes,
                                                 "tensors": [[e.key, list(e.shape), e.dtype] for e in f.entries]}
                                                for f in self.files]}


def plan_files(cfg: ModelConfig, target: Target, tensors: list[CanonicalTensor]) -> FilePlan:
    """The files, keys, shapes and dtypes a Megatron target layout gets, without weights or output."""
    lay = target.megatron
    par = lay.layout
    validate_layout(cfg, target.fmt, lay)
    check_split(tensors, par.tp, par.expert_tp)
    dtype = target.dtype or torch.bfloat16
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    padded = lay.padded_vocab(cfg)
    folder = iteration_dir(Path(), lay.iteration)
    if target.fmt == "torch":
        shapes = {t.name: t.shape for t in tensors}
        stages = legacy.legacy_plan([t.name for t in tensors], {t.name: t.spec for t in tensors}, lay, cfg.num_layers,
                                    cfg.tie_embeddings, cfg.moe.num_experts if cfg.moe else 0)
        files: dict[tuple[int, int, int], PlannedFile] = {}
        for p in range(par.pp):
            for e in range(par.ep):
                for t in range(par.tp):
                    path = folder / legacy.rank_dir(t, p, par.pp, e, par.ep) / legacy.FILE
                    files[(p, e, t)] = PlannedFile(str(path), [])
            for entry in stages[p]:
                shape = list(shapes[entry.canonical])
                spec = entry.spec
                if spec.vocab:
                    shape[0] = padded
                local = spec.local_shape(shape, par.tp) if spec.axis == "tp" else tuple(shape)
                kind = name(storage_dtype(entry.canonical, dtype))
                for e, key in entry.targets:
                    for t in range(par.tp):
                        files[(p, e, t)].entries.append(PlannedEntry(key, local, kind))
        return FilePlan(target.fmt, lay, list(files.values()))
    chunks = dist_chunks(cfg, tensors, None, lay.spelling, padded, dtype)
    keys: dict[str, PlannedEntry] = {}
    for c in chunks:
        keys.setdefault(c.key, PlannedEntry(c.key, c.global_shape, name(c.dtype)))
    if target.fmt == "zarr":
        return FilePlan(target.fmt, lay, [PlannedFile(str(folder / k), [e]) for k, e in keys.items()])
    return FilePlan(target.fmt, lay, [PlannedFile(str(folder), list(keys.values()))])
