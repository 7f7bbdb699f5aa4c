"""`mzoo convert` / `mzoo reshard`: one streaming pipeline, source -> (adapter) -> sharder -> writer,
or, with `plan`, what the output would hold without writing it.

Which tensors exist and how they split comes from a meta model of the configuration
(ShardSpecs), never from a table here.
"""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch

from mzoo.ckpt.assets import tokenizer_assets
from mzoo.ckpt.atomic import check_destination
from mzoo.ckpt.hf import is_hf_checkpoint, parse_dtype, parse_size, storage_dtype
from mzoo.ckpt.integrity import is_finite, nonfinite_message
from mzoo.ckpt.megatron.checkpoint import FORMATS, MegatronCheckpoint, Target, validate_layout
from mzoo.ckpt.megatron.files import FilePlan, plan_files
from mzoo.ckpt.megatron.write import write_megatron
from mzoo.ckpt.sink import TensorExtents
from mzoo.config import ModelConfig
from mzoo.converters import adapter as adapters
from mzoo.converters.hf import save_hf
from mzoo.errors import UserError
from mzoo.jobs.sources import Source, open_source, with_adapter
from mzoo.layout import Layout
from mzoo.models.canonical import plan_tensors
from mzoo.parallel.sharding import CanonicalTensor, check_split
from mzoo.zoo import names, resolve


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
        validate_layout(src.cfg, target.fmt, target.megatron)
        lay = target.megatron.layout
        check_split(src.tensors, lay.tp, lay.expert_tp)


def output_bytes(tensors: list[CanonicalTensor], dtype: torch.dtype) -> int:
    """What a conversion writes: every canonical tensor at the dtype it is stored in (fp32 ones stay
    fp32); vocabulary padding, headers and metadata are within check_space's slack."""
    return sum(math.prod(t.shape) * storage_dtype(t.name, dtype).itemsize for t in tensors)


def convert(src: Source, dst: str | Path, target: Target, overwrite: bool = False,
            progress: Optional[Callable[[int], None]] = None, allow_nonfinite: bool = False) -> Summary:
    dst = Path(dst)
    validate_target(src, target)
    dtype = target.dtype or src.dtype
    check_destination(dst, overwrite, need_bytes=output_bytes(src.tensors, dtype))
    tick = progress or (lambda n: None)
    start = time.perf_counter()
    cfg = src.cfg

    def finite(name: str, value):
        """Each tensor as it streams past (after any cast: fp32 -> fp16 can overflow to Inf)."""
        if not allow_nonfinite and not is_finite(value):
            raise UserError(nonfinite_message(name, src.path, "pass --allow-nonfinite to convert it anyway"))
        return value

    def fetch(name: str) -> torch.Tensor:
        value = src.get(name)
        return finite(name, value.to(storage_dtype(name, dtype) if target.fmt != "hf" else dtype))

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
        return finite(name, got)

    if target.fmt == "hf":
        def stream():
            for t in src.tensors:
                value = extents(t.name)
                if value is None:
                    value = fetch(t.name)
                tick(value.nbytes)
                yield t.name, value

        save_hf(cfg, stream(), dst, dtype=dtype, max_shard_bytes=target.max_shard_bytes,
                assets=src.assets, overwrite=overwrite)
    else:
        write_megatron(cfg, src.tensors, fetch, dst, target, dtype, src.iteration, overwrite, tick, src.assets, extents)
    lay = target.megatron.layout if target.fmt != "hf" else Layout()
    return Summary(str(src.path), str(dst), src.fmt, target.fmt, lay.tp, lay.pp, lay.vpp, src.nbytes,
                   time.perf_counter() - start, peak_rss_gb(), lay.ep)


def plan_layout(cfg: ModelConfig, target: Target, tensors: Optional[list[CanonicalTensor]] = None) -> FilePlan:
    """The files, keys, shapes and dtypes a Megatron target layout gets, without weights or output
    (`tensors` defaults to the config's, built fast for huge MoE models)."""
    return plan_files(cfg, target, tensors if tensors is not None else plan_tensors(cfg))


# ---- the job -------------------------------------------------------------------------------------------
Progress = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]  # (total bytes, label) -> tick


def no_progress(total: int, label: str) -> AbstractContextManager[Callable[[int], None]]:
    return nullcontext(lambda n: None)


@dataclass(frozen=True)
class ConvertRequest:
    """`mzoo convert` / `mzoo reshard` as typed: source, destination, the target format and layout."""

    src: Path
    dst: Path
    to: Literal["hf", "megatron"]
    expect: Optional[Literal["hf", "megatron"]] = None  # the source kind the direction names
    megatron_format: str = "torch_dist"
    layout: Layout = Layout()  # of the Megatron output
    spec: str = "te"
    moe_grouped_gemm: bool = False
    dtype: Optional[str] = None
    shard_size: str = "5GB"
    trust_pickle: bool = False
    vocab_size: Optional[int] = None
    overwrite: bool = False
    plan: bool = False  # describe the output's files, write nothing
    tokenizer: Optional[Path] = None  # a tokenizer folder to carry (replaces the source's files of the same name)
    allow_nonfinite: bool = False  # write NaN / Inf weights instead of refusing
    merge: Optional[Path] = None  # a peft LoRA adapter merged into the weights on the way

    def megatron_layout(self, cfg: ModelConfig, iteration: int | str = 0) -> MegatronCheckpoint:
        return MegatronCheckpoint(layout=self.layout, spelling=self.spec, iteration=iteration,
                                  make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
                                  moe_grouped_gemm=self.moe_grouped_gemm)


def _check(req: ConvertRequest) -> None:
    if req.spec not in ("te", "local"):
        raise UserError(f"unknown --spec '{req.spec}'; use te or local.")
    if req.megatron_format not in ("torch", "torch_dist", "zarr"):
        raise UserError(f"unknown --megatron-format '{req.megatron_format}'; use torch, torch_dist or zarr.")
    if req.plan and req.to == "hf":
        raise UserError("--plan describes Megatron layouts; drop it for Hugging Face output.")
    if req.tokenizer is not None:
        tokenizer_assets(req.tokenizer)  # one sentence when the folder holds no tokenizer


def run(req: ConvertRequest, progress: Progress = no_progress, opened: Optional[Source] = None) -> Union[Summary, FilePlan]:
    """Convert (or, with `plan`, describe) one checkpoint (`opened`: req.src, already open); every user
    error is raised before any output."""
    _check(req)
    dtype = parse_dtype(req.dtype)
    max_bytes = parse_size(req.shard_size)
    architecture = config_only(req.src) if req.plan and opened is None else None
    if architecture is not None:  # plan from the architecture alone: no weights needed
        target = Target(req.megatron_format, req.megatron_layout(architecture, "release"), dtype or torch.bfloat16, max_bytes)
        return plan_layout(architecture, target)
    src = opened or open_source(req.src, req.trust_pickle, req.vocab_size)
    src = with_adapter(src, req.merge)
    if req.expect == "hf" and src.fmt != "hf":
        raise UserError(f"{req.src} is a Megatron ({src.fmt}) checkpoint, not Hugging Face; use 'megatron->...'.")
    if req.expect == "megatron" and src.fmt == "hf":
        raise UserError(f"{req.src} is a Hugging Face checkpoint, not Megatron; use 'hf->...'.")
    if req.tokenizer is not None:
        src.assets = src.assets.with_tokenizer(tokenizer_assets(req.tokenizer))
    fmt = "hf" if req.to == "hf" else req.megatron_format
    layout = req.megatron_layout(src.cfg, src.iteration)
    if req.plan:
        return plan_layout(src.cfg, Target(fmt, layout, dtype or src.dtype, max_bytes), src.tensors)
    with progress(src.nbytes, f"{src.fmt} -> {fmt}") as tick:
        return convert(src, req.dst, Target(fmt, layout, dtype, max_bytes), req.overwrite, tick, req.allow_nonfinite)


def config_only(src: Path) -> Optional[ModelConfig]:
    """The ModelConfig when SRC names an architecture without weights (a zoo preset, a model YAML,
    or a folder with only config.json), else None."""
    text = str(src)
    if src.is_dir():
        if is_hf_checkpoint(src) or not (src / "config.json").exists():
            return None
        hf = json.loads((src / "config.json").read_text())
        return adapters.for_hf_config(hf).config_from_hf(hf)
    if src.exists() and src.suffix not in (".yaml", ".yml"):
        return None
    if src.exists() or text in names():
        return resolve(text)
    return None


@dataclass(frozen=True)
class Reshard:
    """`mzoo reshard` as typed: None keeps the source's own value (its TP, PP, VPP, EP, stage split,
    Megatron format, spelling and legacy expert naming), so a flag changes only what it names.
    VPP and the uneven stage ends belong to a pipeline split: a new --pp resets them unless given."""

    src: Path
    dst: Path
    tp: Optional[int] = None
    pp: Optional[int] = None
    vpp: Optional[int] = None
    ep: Optional[int] = None
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    megatron_format: Optional[str] = None
    spec: Optional[str] = None
    moe_grouped_gemm: Optional[bool] = None
    dtype: Optional[str] = None
    trust_pickle: bool = False
    vocab_size: Optional[int] = None
    overwrite: bool = False
    plan: bool = False
    tokenizer: Optional[Path] = None
    allow_nonfinite: bool = False

    def resolve(self, fmt: str, was: MegatronCheckpoint) -> ConvertRequest:
        """The convert request this reshard means for a source in Megatron format `fmt` saved as `was`."""
        lay = was.layout
        same_pipeline = self.pp is None or self.pp == lay.pp
        pick = lambda asked, kept: kept if asked is None else asked  # noqa: E731
        layout = Layout(tp=pick(self.tp, lay.tp), pp=pick(self.pp, lay.pp),
                        vpp=pick(self.vpp, lay.vpp if same_pipeline else 1), ep=pick(self.ep, lay.ep),
                        first_stage_layers=pick(self.first_stage_layers, lay.first_stage_layers if same_pipeline else None),
                        last_stage_layers=pick(self.last_stage_layers, lay.last_stage_layers if same_pipeline else None))
        return ConvertRequest(src=self.src, dst=self.dst, to="megatron", expect="megatron",
                              megatron_format=pick(self.megatron_format, fmt), layout=layout,
                              spec=pick(self.spec, was.spelling),
                              moe_grouped_gemm=pick(self.moe_grouped_gemm, was.moe_grouped_gemm), dtype=self.dtype,
                              trust_pickle=self.trust_pickle, vocab_size=self.vocab_size, overwrite=self.overwrite,
                              plan=self.plan, tokenizer=self.tokenizer, allow_nonfinite=self.allow_nonfinite)


def reshard(req: Reshard, progress: Progress = no_progress) -> Union[Summary, FilePlan]:
    """Reshard one Megatron checkpoint, keeping every setting the request leaves None (a --plan of an
    architecture without weights starts from tp=pp=ep=1, torch_dist, te)."""
    asked = ConvertRequest(req.src, req.dst, "megatron", "megatron", req.megatron_format or "torch_dist",
                           spec=req.spec or "te", plan=req.plan, tokenizer=req.tokenizer)
    _check(asked)  # the flags first, in one sentence, before the source is read
    if req.plan and config_only(req.src) is not None:
        return run(req.resolve("torch_dist", MegatronCheckpoint()), progress)
    src = open_source(req.src, req.trust_pickle, req.vocab_size)
    return run(req.resolve(src.fmt, src.megatron or MegatronCheckpoint()), progress, src)
