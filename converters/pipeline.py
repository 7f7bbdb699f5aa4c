"""convert and reshard: one pipeline, reader -> (adapter) -> sharder -> writer.

A Source yields canonical tensors (global, unpadded) one at a time from any format and layout; a
writer places them into a target format and layout. Which tensors exist and how they split comes
from a meta model of the configuration (ShardSpecs), never from a table here.
"""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mzoo.ckpt import dist as dist_fmt
from mzoo.ckpt import legacy
from mzoo.ckpt.atomic import atomic_dir, check_destination, fsync_tree
from mzoo.ckpt.hf import CheckpointError, HFReader, is_hf_checkpoint
from mzoo.ckpt.megatron import (
    MegatronLayout,
    args_to_config,
    args_to_layout,
    config_to_args,
    find_iteration_dir,
    iteration_dir,
    to_spelling,
    write_tracker,
)
from mzoo.ckpt.sidecar import read_sidecar, write_sidecar
from mzoo.config import ModelConfig, ParallelConfig
from mzoo.params import count_params
from mzoo.converters import adapter as adapters
from mzoo.converters.hf import CanonicalTensor, canonical_tensors, load_canonical, save_hf
from mzoo.errors import UserError
from mzoo.parallel.sharding import ShardSpec, pad_vocab

FORMATS = ("hf", "torch", "torch_dist", "zarr")


# ---- detection ------------------------------------------------------------------------------------
def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; check the path.")
    if is_hf_checkpoint(path):
        return "hf"
    if path.is_dir() and (path / "config.json").exists():
        HFReader(path)  # raises the precise reason (no weights, pickled .bin, ...)
    try:
        folder, _ = find_iteration_dir(path)
    except CheckpointError:
        raise CheckpointError(
            f"{path} is not a checkpoint mzoo recognises (no config.json + safetensors, no Megatron "
            "latest_checkpointed_iteration.txt or iter_* folder)."
        ) from None
    backend = dist_fmt.is_dist_checkpoint(folder)
    if backend in ("torch_dist", "zarr"):
        return backend
    if any(folder.glob("mp_rank_*")):
        return "torch"
    if (folder / ".metadata").exists() or any(folder.glob("*.distcp")):
        raise CheckpointError(f"{folder} has DCP files but no metadata.json: the save did not finish.")
    raise CheckpointError(f"{folder} holds neither mp_rank_* folders nor a metadata.json; it is incomplete.")


# ---- sources --------------------------------------------------------------------------------------
@dataclass
class Source:
    """Canonical tensors of one checkpoint, any format and layout."""

    path: Path
    fmt: str
    cfg: ModelConfig
    dtype: torch.dtype
    get: Callable[[str], torch.Tensor]
    layout: Optional[MegatronLayout] = None
    iteration: int | str = 0
    tokenizer_files: list[Path] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    tensors: list[CanonicalTensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        shapes = {t.name: t.shape for t in self.tensors}
        raw = self.get

        def checked(name: str) -> torch.Tensor:
            value = raw(name)
            if tuple(value.shape) != shapes[name]:
                raise CheckpointError(
                    f"{name} has shape {tuple(value.shape)} in {self.path} but the config implies {shapes[name]}; "
                    "the checkpoint does not match its config."
                )
            return value

        self.get = checked

    @property
    def nbytes(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(int(torch.Size(t.shape).numel()) * size for t in self.tensors)


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _megatron_config(root: Path, args: Any, vocab_size: Optional[int]) -> ModelConfig:
    side = read_sidecar(root)
    if side and "model" in side:
        cfg = ModelConfig.from_dict(side["model"], where=str(root / "mzoo.yaml"))
    elif args is not None:
        cfg = args_to_config(args)
    else:
        raise CheckpointError(f"{root} carries neither mzoo.yaml nor Megatron args; mzoo cannot tell the architecture.")
    if vocab_size is not None:
        cfg = cfg.replace(vocab_size=vocab_size)
    return cfg


def _trim(spec: ShardSpec, value: torch.Tensor, vocab: int) -> torch.Tensor:
    return value[:vocab] if spec.vocab and value.shape[0] > vocab else value


def open_source(path: str | Path, trust_pickle: bool = False, vocab_size: Optional[int] = None) -> Source:
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        from mzoo.converters.hf import read_config

        reader, adapter, cfg = read_config(path)
        first = reader.names()[0]
        dtype = reader.torch_dtype(first)
        return Source(path, fmt, cfg, dtype, lambda n: adapter.to_canonical(n, reader.get, cfg),
                      tokenizer_files=reader.tokenizer_files(), files=_files(path), tensors=canonical_tensors(cfg))
    folder, iteration = find_iteration_dir(path)
    root = folder.parent if folder != path else path
    if fmt == "torch":
        reader = legacy.LegacyReader(path, trust_pickle)
        cfg = _megatron_config(root, reader.args, vocab_size)
        tensors = canonical_tensors(cfg)
        specs = {t.name: t.spec for t in tensors}
        reader.bind(cfg.num_layers, specs)
        get = lambda n: _trim(specs[n], reader.get(n), cfg.vocab_size)  # noqa: E731
        return Source(path, fmt, cfg, reader.dtype, get, reader.layout, iteration, files=_files(folder), tensors=tensors)
    store = dist_fmt.DistReader(folder, trust_pickle) if fmt == "torch_dist" else _zarr_reader(folder)
    common = store.common
    args = common.get("args") if isinstance(common, dict) else None
    cfg = _megatron_config(root, args, vocab_size)
    tensors = canonical_tensors(cfg)
    specs = {t.name: t.spec for t in tensors}
    # key spelling on disk (megatron-core writes TE names; older tools may not) vs the model spec in args
    spec = "local" if any(k.endswith("input_layernorm.weight") for k in store.keys()) else "te"
    layout = args_to_layout(args) if args is not None else MegatronLayout(spec=spec)
    layout.iteration = iteration
    some = store.keys()[0]
    dtype = store.dtype(some)

    def get(name: str) -> torch.Tensor:
        key, layer = stacked_key(name, spec)
        return _trim(specs[name], store.read(key, layer), cfg.vocab_size)

    return Source(path, fmt, cfg, dtype, get, layout, iteration, files=_files(folder), tensors=tensors)


def _zarr_reader(folder: Path):
    from mzoo.ckpt import zarr as zarr_fmt

    return zarr_fmt.ZarrCheckpoint(folder)


def load_checkpoint(model, path: str | Path, trust_pickle: bool = False) -> Source:
    """Fill this rank's model (any layout) from a checkpoint in any format and layout: reshard on load."""
    src = open_source(path, trust_pickle)
    diff = model.cfg.architecture_differences(src.cfg)
    if diff:
        raise UserError(f"{path} holds a different model ({', '.join(diff)} differ); pick the matching preset.")
    load_canonical(model, src.get)
    return src


def describe(path: Path, trust_pickle: bool = False, vocab_size: Optional[int] = None) -> dict[str, Any]:
    """What a checkpoint is, without loading its weights; files checked against mzoo.yaml's sizes."""
    src = open_source(path, trust_pickle, vocab_size)
    lay = src.layout
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
    count = count_params(src.cfg)
    return {
        "path": str(path),
        "format": src.fmt,
        "iteration": src.iteration if src.fmt != "hf" else None,
        "tp": lay.tp if lay else 1,
        "pp": lay.pp if lay else 1,
        "vpp": lay.vpp if lay else 1,
        "spec": lay.spec if lay else None,
        "dtype": str(src.dtype).replace("torch.", ""),
        "num_params": count.total,
        "active_params": count.active,
        "vocab_size": src.cfg.vocab_size,
        "total_bytes": sum(src.files.values()),
        "files": src.files,
        "written_by_mzoo": bool(side),
        "problems": problems,
        "model": src.cfg.to_dict(),
    }


def stacked_key(name: str, spec: str) -> tuple[str, Optional[int]]:
    """Canonical name -> (torch_dist key, layer index on the leading axis)."""
    layer, rest = legacy.split_layer_name(name)
    if layer is None:
        return to_spelling(name, spec), None
    return "decoder.layers." + to_spelling(rest, spec), layer


# ---- targets --------------------------------------------------------------------------------------
@dataclass
class Target:
    fmt: str
    layout: MegatronLayout = field(default_factory=MegatronLayout)
    dtype: Optional[torch.dtype] = None
    max_shard_bytes: int = 5 * 10**9


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
    lay = target.layout
    ParallelConfig(tp=lay.tp, pp=lay.pp, vpp=lay.vpp).validate_for(src.cfg)
    if target.fmt == "hf":
        adapters.for_family(src.cfg.family).config_to_hf(src.cfg)
    else:
        from mzoo.parallel.pipeline import stage_layers

        stage_layers(src.cfg.num_layers, lay.pp, lay.vpp, lay.first_stage_layers, lay.last_stage_layers)


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
        value = src.get(name).to(dtype)
        return value

    if target.fmt == "hf":
        def stream():
            for t in src.tensors:
                value = fetch(t.name)
                tick(value.numel() * value.element_size())
                yield t.name, value

        save_hf(cfg, stream(), dst, dtype=dtype, max_shard_bytes=target.max_shard_bytes,
                tokenizer_files=src.tokenizer_files, overwrite=overwrite)
    else:
        write_megatron(cfg, src.tensors, fetch, dst, target, dtype, src.iteration, overwrite, tick, src.tokenizer_files)
    lay = target.layout if target.fmt != "hf" else MegatronLayout()
    return Summary(str(src.path), str(dst), src.fmt, target.fmt, lay.tp, lay.pp, lay.vpp, src.nbytes,
                   time.perf_counter() - start, peak_rss_gb())


def write_megatron(cfg: ModelConfig, tensors: list[CanonicalTensor], fetch: Callable[[str], torch.Tensor], dst: Path,
                   target: Target, dtype: torch.dtype, iteration: int | str, overwrite: bool,
                   tick: Callable[[int], None], tokenizer_files: list[Path] = ()) -> None:
    """A new Megatron checkpoint folder (tracker + one iteration), atomically."""
    with atomic_dir(dst, overwrite) as tmp:
        _write_iteration(iteration_dir(tmp, iteration), cfg, tensors, fetch, target, dtype, iteration, tick)
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
                     iteration: int | str, tick: Callable[[int], None]) -> None:
    lay = target.layout
    lay.iteration = iteration
    padded = lay.padded_vocab(cfg)
    args = config_to_args(cfg, lay, dtype)
    specs = {t.name: t.spec for t in tensors}
    if target.fmt == "torch":
        folder.mkdir()
        legacy.write_legacy(folder, [t.name for t in tensors], fetch, specs, lay, cfg.num_layers, args, padded,
                            cfg.tie_embeddings, tick)
        return
    # megatron-core stores norms under their TE names in torch_dist whatever the spec
    # (its local-spec modules map input_layernorm -> linear_qkv.layer_norm_* on save).
    chunks = dist_chunks(cfg, tensors, fetch, "te", padded, dtype)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration}
    if target.fmt == "torch_dist":
        dist_fmt.write_dist(folder, chunks, common, tick)
    else:
        from mzoo.ckpt import zarr as zarr_fmt

        zarr_fmt.write_checkpoint(folder, chunks, common, tick)


def _finish_root(root: Path, cfg: ModelConfig, target: Target, dtype: torch.dtype, iteration: int | str) -> None:
    lay = target.layout
    write_sidecar(root, cfg, target.fmt, str(dtype).replace("torch.", ""), lay.parallel(),
                  extra={"iteration": iteration, "spec": lay.spec, "padded_vocab_size": lay.padded_vocab(cfg)})
    write_tracker(root, iteration)  # last: marks the checkpoint complete


def dist_chunks(cfg: ModelConfig, tensors: list[CanonicalTensor], fetch: Callable[[str], torch.Tensor],
                spec: str, padded: int, dtype: torch.dtype) -> list[dist_fmt.Chunk]:
    """One chunk per layer of every stacked key, one per non-layer tensor; vocab rows padded."""
    chunks = []
    layers = cfg.num_layers
    for t in tensors:
        key, layer = stacked_key(t.name, spec)
        shape = list(t.shape)
        if t.spec.vocab:
            shape[0] = padded

        def produce(name=t.name, vocab=t.spec.vocab) -> torch.Tensor:
            value = fetch(name)
            return pad_vocab(value, padded) if vocab else value

        if layer is None:
            chunks.append(dist_fmt.Chunk(key, tuple(shape), (0,) * len(shape), tuple(shape), dtype, produce))
        else:
            chunks.append(dist_fmt.Chunk(key, (layers, *shape), (layer,) + (0,) * len(shape), (1, *shape), dtype,
                                         lambda p=produce: p().unsqueeze(0)))
    return chunks
