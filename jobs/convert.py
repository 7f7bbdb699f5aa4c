"""`mzoo convert` / `mzoo reshard`: one streaming pipeline, source -> (adapter) -> sharder -> writer,
or, with `plan`, what the output would hold without writing it.

Which tensors exist and how they split comes from a meta model of the configuration
(ShardSpecs), never from a table here.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mzoo.ckpt.atomic import check_destination
from mzoo.ckpt.hf import storage_dtype
from mzoo.ckpt.megatron.layout import FORMATS, MegatronLayout, Target, validate_layout
from mzoo.ckpt.megatron.write import write_megatron
from mzoo.ckpt.sink import TensorExtents
from mzoo.config import ModelConfig
from mzoo.converters import adapter as adapters
from mzoo.converters.hf import save_hf
from mzoo.errors import UserError
from mzoo.ckpt.megatron.files import FilePlan, plan_files
from mzoo.models.canonical import plan_tensors
from mzoo.parallel.sharding import CanonicalTensor
from mzoo.jobs.sources import Source


@dataclass
class Summary:
    src: str
    dst: str
    src_format: str
    dst_format: str
    tp: int
    pp: int
    vpp: int
    bytes: int
    seconds: float
    peak_rss_gb: float
    ep: int = 1

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "gb_per_s": self.gb_per_s}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def validate_target(src: Source, target: Target) -> None:
    """Every reason the conversion cannot work, before any output exists."""
    if target.fmt not in FORMATS:
        raise UserError(f"unknown format '{target.fmt}'; use one of {', '.join(FORMATS)}.")
    if target.fmt == "hf":
        adapters.for_family(src.cfg.family).config_to_hf(src.cfg)
    else:
        validate_layout(src.cfg, target.fmt, target.layout)


def convert(src: Source, dst: str | Path, target: Target, overwrite: bool = False,
            progress: Optional[Callable[[int], None]] = None) -> Summary:
    dst = Path(dst)
    validate_target(src, target)
    check_destination(dst, overwrite)
    tick = progress or (lambda n: None)
    start = time.perf_counter()
    dtype = target.dtype or src.dtype
    cfg = src.cfg

    def fetch(name: str) -> torch.Tensor:
        value = src.get(name)
        return value.to(storage_dtype(name, dtype) if target.fmt != "hf" else dtype)

    shapes = {t.name: t.shape for t in src.tensors}
    adapter = adapters.for_family(cfg.family) if target.fmt == "hf" else None

    def extents(name: str) -> Optional[TensorExtents]:
        """Where a tensor's bytes already are and go unchanged: same dtype, the shape the config
        implies, a mapping that moves whole rows (the writer copies them in the kernel)."""
        got = src.extents(name) if src.extents is not None else None
        want = storage_dtype(name, dtype)
        if got is None or got.dtype != want or got.shape != shapes[name]:
            return None
        if adapter is not None and adapter.hf_extents(name, got, cfg) is None:
            return None
        return got

    if target.fmt == "hf":
        def stream():
            for t in src.tensors:
                value = extents(t.name)
                if value is None:
                    value = fetch(t.name)
                tick(value.nbytes)
                yield t.name, value

        save_hf(cfg, stream(), dst, dtype=dtype, max_shard_bytes=target.max_shard_bytes,
                tokenizer_files=src.tokenizer_files, overwrite=overwrite)
    else:
        write_megatron(cfg, src.tensors, fetch, dst, target, dtype, src.iteration, overwrite, tick, src.tokenizer_files,
                       extents)
    lay = target.layout if target.fmt != "hf" else MegatronLayout()
    return Summary(str(src.path), str(dst), src.fmt, target.fmt, lay.tp, lay.pp, lay.vpp, src.nbytes,
                   time.perf_counter() - start, peak_rss_gb(), lay.ep)


def plan_layout(cfg: ModelConfig, target: Target, tensors: Optional[list[CanonicalTensor]] = None) -> FilePlan:
    """The files, keys, shapes and dtypes a Megatron target layout gets, without weights or output
    (`tensors` defaults to the config's, built fast for huge MoE models)."""
    return plan_files(cfg, target, tensors if tensors is not None else plan_tensors(cfg))
