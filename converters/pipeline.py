"""convert and reshard: one pipeline, reader -> (adapter) -> sharder -> writer.

A Source yields canonical tensors (global, unpadded) one at a time from any format and layout; a
writer places them into a target format and layout. Which tensors exist and how they split comes
from a meta model of the configuration (ShardSpecs), never from a table here.
"""

from __future__ import annotations

import math
import re
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
from mzoo.ckpt.hf import CheckpointError, HFReader, is_hf_checkpoint, storage_dtype
from mzoo.ckpt.megatron import (
    MegatronLayout,
    Spelling,
    args_to_config,
    args_to_layout,
    check_expert_tp,
    config_to_args,
    dist_spelling,
    expert_dist_key,
    find_iteration_dir,
    iteration_dir,
    split_sections,
    to_spelling,
    write_tracker,
)
from mzoo.ckpt.sidecar import crc32_file, read_sidecar, write_sidecar
from mzoo.ckpt.sink import TensorExtents, cat_rows
from mzoo.config import ConfigError, ModelConfig, ParallelConfig
from mzoo.params import count_params
from mzoo.converters import adapter as adapters
from mzoo.converters.hf import CanonicalTensor, canonical_tensors, load_canonical, save_hf
from mzoo.errors import UserError
from mzoo.parallel.sharding import ShardSpec, pad_vocab

FORMATS = ("hf", "torch", "torch_dist", "zarr")
_FP32 = torch.float32


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
    # a canonical tensor as extents of the source files (kernel copy), where the format allows it
    extents: Optional[Callable[[str], Optional[TensorExtents]]] = None

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
                      tokenizer_files=reader.tokenizer_files(), files=_files(path), tensors=canonical_tensors(cfg),
                      extents=lambda n: adapter.extents(n, reader, cfg))
    folder, iteration = find_iteration_dir(path)
    root = folder.parent if folder != path else path
    if fmt == "torch":
        reader = legacy.LegacyReader(path, trust_pickle)
        cfg = _megatron_config(root, reader.args, vocab_size)
        tensors = canonical_tensors(cfg)
        specs = {t.name: t.spec for t in tensors}
        reader.bind(cfg.num_layers, specs, cfg.moe.num_experts if cfg.moe else 0)
        get = lambda n: _trim(specs[n], reader.get(n), cfg.vocab_size)  # noqa: E731
        return Source(path, fmt, cfg, reader.dtype, get, reader.layout, iteration, files=_files(folder), tensors=tensors)
    store = dist_fmt.DistReader(folder, trust_pickle) if fmt == "torch_dist" else _zarr_reader(folder)
    common = store.common
    args = common.get("args") if isinstance(common, dict) else None
    if args is not None:
        check_expert_tp(args)
    cfg = _megatron_config(root, args, vocab_size)
    tensors = canonical_tensors(cfg)
    specs = {t.name: t.spec for t in tensors}
    keys = set(store.keys())
    spec = _dist_spec(keys, cfg)  # unless the args name the model's implementation
    layout = args_to_layout(args, None if "transformer_impl" in vars(args) else spec) if args is not None \
        else MegatronLayout(spec=spec)
    layout.iteration = iteration
    where = {t.name: dist_location(t.name, t.spec, keys, cfg, layout.spec, folder) for t in tensors}  # before any read
    dtype = store.dtype(where[tensors[0].name][0][0])

    def get(name: str) -> torch.Tensor:
        parts = [store.read(key, index or None) for key, index in where[name]]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=specs[name].dim)
        return _trim(specs[name], value, cfg.vocab_size)

    def extents(name: str) -> Optional[TensorExtents]:
        if not isinstance(store, dist_fmt.DistReader):
            return None
        parts = [store.extents(key, index or None) for key, index in where[name]]
        if any(p is None for p in parts) or (len(parts) > 1 and specs[name].dim != 0):
            return None
        value = parts[0] if len(parts) == 1 else cat_rows(parts)
        if specs[name].vocab and value.shape[0] > cfg.vocab_size:  # _trim
            value = value.rows(0, cfg.vocab_size)
        return value

    return Source(path, fmt, cfg, dtype, get, layout, iteration, files=_files(folder), tensors=tensors,
                  extents=extents)


def _dist_spec(keys: set[str], cfg: ModelConfig) -> Spelling:
    """The spec a torch_dist/zarr checkpoint was saved from, told by its keys where they differ:
    MLA's separate latent norms (local), MoE layers' own pre-MLP norm (TE) and a Mamba layer's own
    `norm` (local, saved without megatron's TE remapping); dense keys are the same."""
    if cfg.ssm is not None:
        return "local" if any(re.fullmatch(r"decoder\.layers\.\d+\.norm\.weight", k) for k in keys) else "te"
    if cfg.mla is not None:
        return "local" if any(k.endswith("kv_layernorm.weight") for k in keys) else "te"
    if cfg.moe is not None:
        return "te" if any(".pre_mlp_layernorm." in "." + k for k in keys) else "local"
    return "te"


def non_homogeneous(cfg: ModelConfig) -> bool:
    """megatron-core stores every layer under its own `decoder.layers.{N}.` keys when the layers
    differ (moe_layer_freq a list or > 1: DeepSeek's dense first layers) and always in a Mamba or
    hybrid model (MambaStack never stacks); otherwise stacked."""
    if cfg.ssm is not None:
        return True
    return cfg.moe is not None and (cfg.moe.first_k_dense > 0 or cfg.moe.layer_freq > 1)


def dist_key(name: str, cfg: ModelConfig, spec: Spelling, stacked: bool) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """Canonical name -> (torch_dist key, index on its leading axes, sizes of those axes).

    Stacked: `decoder.layers.<name>` [L, ...]; per layer: `decoder.layers.{N}.<name>`; experts add
    a global expert axis under `...mlp.experts.experts.<linear>` ([L, E, ...] or [E, ...])."""
    layer, rest = legacy.split_layer_name(name)
    mla, hybrid = cfg.mla is not None, cfg.ssm is not None
    if layer is None:
        return dist_spelling(name, spec, mla, hybrid), (), ()
    rest, expert = expert_dist_key(rest)
    rest = dist_spelling(rest, spec, mla, hybrid)
    experts = ((expert,), (cfg.moe.num_experts,)) if expert is not None else ((), ())
    if stacked:
        return "decoder.layers." + rest, (layer, *experts[0]), (cfg.num_layers, *experts[1])
    return f"decoder.layers.{layer}.{rest}", experts[0], experts[1]


def dist_location(name: str, shard: ShardSpec, keys: set[str], cfg: ModelConfig, spec: Spelling,
                  folder: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Where a canonical tensor is in a torch_dist/zarr checkpoint, as (key, index) parts to
    concatenate (one part, or a Mamba mixer tensor's sections): the layout's spelling first,
    stacked or per layer, whichever the checkpoint has."""
    other: Spelling = "local" if spec == "te" else "te"
    tries = [dist_key(name, cfg, s, stacked) for s in (spec, other) for stacked in (not non_homogeneous(cfg),
                                                                                   non_homogeneous(cfg))]
    layer, rest = legacy.split_layer_name(name)
    if cfg.ssm is not None and layer is not None:  # megatron's local Mamba spec saved without its TE remapping
        tries.append((f"decoder.layers.{layer}.{to_spelling(rest, 'local')}", (), ()))
    sections = split_sections(name, shard) or ()
    for key, index, _ in tries:
        parts = [f"{key}.{s}" for s in sections] or [key]
        if all(p in keys for p in parts):
            return [(p, index) for p in parts]
    first = tries[0][0] + (f".{sections[0]}" if sections else "")
    raise CheckpointError(f"{folder} has no tensor {first} (for {name}); the checkpoint does not match its config.")


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


def describe(path: Path, trust_pickle: bool = False, vocab_size: Optional[int] = None,
             check: bool = False) -> dict[str, Any]:
    """What a checkpoint is, without loading its weights; files checked against mzoo.yaml's sizes
    and, with `check`, against its CRC-32 checksums (reads every byte)."""
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
        elif check and rel in (side.get("crc32") or {}) and crc32_file(f) != side["crc32"][rel]:
            problems.append(f"{rel} does not match the checksum mzoo.yaml recorded: it is corrupted")
    count = count_params(src.cfg)
    return {
        "path": str(path),
        "format": src.fmt,
        "iteration": src.iteration if src.fmt != "hf" else None,
        "tp": lay.tp if lay else 1,
        "pp": lay.pp if lay else 1,
        "vpp": lay.vpp if lay else 1,
        "ep": lay.ep if lay else 1,
        "spec": lay.spec if lay else None,
        "dtype": str(src.dtype).replace("torch.", ""),
        "num_params": count.total,
        "active_params": count.active,
        "vocab_size": src.cfg.vocab_size,
        "total_bytes": sum(src.files.values()),
        "files": src.files,
        "written_by_mzoo": bool(side),
        "problems": problems,
        "checked": check and bool(side.get("crc32")),
        "model": src.cfg.to_dict(),
    }


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


def validate_layout(cfg: ModelConfig, fmt: str, lay: MegatronLayout) -> None:
    """Every reason `cfg` cannot take this Megatron layout, in one sentence."""
    from mzoo.parallel.pipeline import stage_layers

    if lay.spec not in ("te", "local"):
        raise UserError(f"unknown spec '{lay.spec}'; use te or local.")
    ParallelConfig(tp=lay.tp, pp=lay.pp, vpp=lay.vpp, ep=lay.ep).validate_for(cfg)
    stage_layers(cfg.num_layers, lay.pp, lay.vpp, lay.first_stage_layers, lay.last_stage_layers)
    ssm = cfg.ssm
    if ssm is not None and ssm.version == 1 and cfg.mamba_dims()["d_inner"] % lay.tp:
        raise ConfigError(f"tensor parallel size {lay.tp} does not divide the Mamba inner size "
                          f"({cfg.mamba_dims()['d_inner']}); choose a TP that divides it.")
    mla = cfg.mla
    if fmt == "torch" and lay.spec == "local" and mla is not None and lay.tp > 1:
        # megatron-core's local MLA spec splits the latent down projections' rows over TP
        rows = {"q_lora_rank": mla.q_lora_rank, "kv_lora_rank + qk_rope_head_dim": mla.kv_lora_rank + mla.qk_rope_head_dim}
        for what, n in rows.items():
            if n is not None and n % lay.tp:
                raise ConfigError(f"tensor parallel size {lay.tp} does not divide {what} ({n}), which megatron-core's "
                                  "local MLA spec splits over TP; use --spec te or a TP that divides it.")


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
        return value.to(tensor_dtype(name, dtype) if target.fmt != "hf" else dtype)

    shapes = {t.name: t.shape for t in src.tensors}
    adapter = adapters.for_family(cfg.family) if target.fmt == "hf" else None

    def extents(name: str) -> Optional[TensorExtents]:
        """Where a tensor's bytes already are and go unchanged: same dtype, the shape the config
        implies, a mapping that moves whole rows (the writer copies them in the kernel)."""
        got = src.extents(name) if src.extents is not None else None
        want = storage_dtype(name, dtype) if target.fmt == "hf" else tensor_dtype(name, dtype)
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


def tensor_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a Megatron checkpoint stores a tensor in: megatron-core keeps the router's
    expert_bias in fp32 whatever the model's dtype."""
    return _FP32 if name.endswith("mlp.router.expert_bias") else dtype


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
    lay = target.layout
    lay.iteration = iteration
    padded = lay.padded_vocab(cfg)
    args = config_to_args(cfg, lay, dtype)
    specs = {t.name: t.spec for t in tensors}
    if target.fmt == "torch":
        folder.mkdir()
        legacy.write_legacy(folder, [t.name for t in tensors], fetch, specs, lay, cfg.num_layers, args, padded,
                            cfg.tie_embeddings, tick, cfg.moe.num_experts if cfg.moe else 0, extents)
        return
    chunks = dist_chunks(cfg, tensors, fetch, lay.spec, padded, dtype, extents)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration}
    if target.fmt == "torch_dist":
        dist_fmt.write_dist(folder, chunks, common, tick, dist_objects(cfg))
    else:
        from mzoo.ckpt import zarr as zarr_fmt

        zarr_fmt.write_checkpoint(folder, chunks, common, tick)


def dist_objects(cfg: ModelConfig) -> dict[str, Any]:
    """ShardedObjects beyond the decoder's `_extra_state`: megatron-core's MambaModel (unlike
    GPTModel, which drops it) declares its output layer's, tied or not."""
    return {"output_layer._extra_state/shard_0_1": [None]} if cfg.ssm is not None else {}


def _finish_root(root: Path, cfg: ModelConfig, target: Target, dtype: torch.dtype, iteration: int | str) -> None:
    lay = target.layout
    write_sidecar(root, cfg, target.fmt, str(dtype).replace("torch.", ""), lay.parallel(),
                  extra={"iteration": iteration, "spec": lay.spec, "padded_vocab_size": lay.padded_vocab(cfg)})
    write_tracker(root, iteration)  # last: marks the checkpoint complete


def dist_chunks(cfg: ModelConfig, tensors: list[CanonicalTensor], fetch: Optional[Callable[[str], torch.Tensor]],
                spec: Spelling, padded: int, dtype: torch.dtype,
                extents: Optional[Callable[[str], Optional[TensorExtents]]] = None) -> list[dist_fmt.Chunk]:
    """One chunk per canonical tensor (per layer of a stacked key, per expert of an expert key),
    under the keys megatron-core uses for `spec` (see dist_key); vocab rows padded. `fetch` None
    plans without weights."""
    chunks = []
    stacked = not non_homogeneous(cfg)
    for t in tensors:
        key, index, lead = dist_key(t.name, cfg, spec, stacked)
        shape = list(t.shape)
        if t.spec.vocab:
            shape[0] = padded
        sections = split_sections(t.name, t.spec)
        if sections:
            chunks += _section_chunks(key, t, sections, fetch, tensor_dtype(t.name, dtype))
            continue

        def produce(name=t.name, vocab=t.spec.vocab, n=len(lead)) -> torch.Tensor:
            value = fetch(name)
            value = pad_vocab(value, padded) if vocab else value
            return value.reshape((1,) * n + tuple(value.shape))

        def where(name=t.name, vocab=t.spec.vocab, n=len(lead)) -> Optional[TensorExtents]:
            got = extents(name) if extents is not None else None
            if got is None:
                return None
            got = got.pad_rows(padded) if vocab else got
            return TensorExtents((1,) * n + got.shape, got.dtype, got.extents)

        chunks.append(dist_fmt.Chunk(key, (*lead, *shape), (*index,) + (0,) * len(shape), (1,) * len(lead) + tuple(shape),
                                     tensor_dtype(t.name, dtype), produce, prepend=len(lead), extents=where))
    return chunks


def _section_chunks(key: str, t: CanonicalTensor, names: tuple[str, ...],
                    fetch: Optional[Callable[[str], torch.Tensor]], dtype: torch.dtype) -> list[dist_fmt.Chunk]:
    """A Mamba mixer tensor as megatron-core's _split_tensor_factory stores it: one global key per
    section, `<key>.<section>`; the tensor is fetched once for all its sections."""
    held: dict[str, tuple[torch.Tensor, ...]] = {}

    def section(i: int) -> torch.Tensor:
        if t.name not in held:
            held.clear()
            held[t.name] = fetch(t.name).split(list(t.spec.sections), dim=t.spec.dim)
        value = held[t.name][i]
        if i == len(names) - 1:
            held.clear()
        return value

    out = []
    for i, (name, size) in enumerate(zip(names, t.spec.sections)):
        shape = list(t.shape)
        shape[t.spec.dim] = size
        out.append(dist_fmt.Chunk(f"{key}.{name}", tuple(shape), (0,) * len(shape), tuple(shape), dtype,
                                  lambda i=i: section(i)))
    return out


# ---- planning: what a target layout gets, from the config alone ------------------------------------
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
class Plan:
    fmt: str
    layout: MegatronLayout
    files: list[PlannedFile]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {"format": self.fmt, "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "ep": lay.ep, "spec": lay.spec,
                "bytes": self.nbytes, "files": [{"path": f.path, "bytes": f.nbytes,
                                                 "tensors": [[e.key, list(e.shape), e.dtype] for e in f.entries]}
                                                for f in self.files]}


def plan_tensors(cfg: ModelConfig) -> list[CanonicalTensor]:
    """canonical_tensors(cfg), fast for huge MoE models: a meta model of one layer of each kind
    (dense prefix, each MoE-period position) is built and its layers repeated, instead of
    building every expert of every layer."""
    moe = cfg.moe
    if moe is None or cfg.ssm is not None or cfg.num_layers <= (moe.first_k_dense > 0) + moe.layer_freq:
        return canonical_tensors(cfg)
    dense = int(moe.first_k_dense > 0)
    small = cfg.replace(num_layers=dense + moe.layer_freq, **{"moe.first_k_dense": dense})
    template: dict[int, list[CanonicalTensor]] = {}
    head, tail = [], []
    for t in canonical_tensors(small):
        layer, rest = legacy.split_layer_name(t.name)
        if layer is None:
            (tail if template else head).append(t)
        else:
            template.setdefault(layer, []).append(CanonicalTensor(rest, t.shape, t.spec))
    out = list(head)
    for n in range(cfg.num_layers):
        kind = 0 if n < moe.first_k_dense else dense + (n - moe.first_k_dense) % moe.layer_freq
        out += [CanonicalTensor(f"decoder.layers.{n}.{t.name}", t.shape, t.spec) for t in template[kind]]
    return out + tail


def plan_layout(cfg: ModelConfig, target: Target, tensors: Optional[list[CanonicalTensor]] = None) -> Plan:
    """The files, keys, shapes and dtypes a Megatron target layout gets, without weights or output."""
    lay = target.layout
    validate_layout(cfg, target.fmt, lay)
    tensors = tensors if tensors is not None else plan_tensors(cfg)
    dtype = target.dtype or torch.bfloat16
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    padded = lay.padded_vocab(cfg)
    folder = iteration_dir(Path(), lay.iteration)
    if target.fmt == "torch":
        shapes = {t.name: t.shape for t in tensors}
        stages = legacy.legacy_plan([t.name for t in tensors], {t.name: t.spec for t in tensors}, lay, cfg.num_layers,
                                    cfg.tie_embeddings, cfg.moe.num_experts if cfg.moe else 0)
        files: dict[tuple[int, int, int], PlannedFile] = {}
        for p in range(lay.pp):
            for e in range(lay.ep):
                for t in range(lay.tp):
                    path = folder / legacy.rank_dir(t, p, lay.pp, e, lay.ep) / legacy.FILE
                    files[(p, e, t)] = PlannedFile(str(path), [])
            for entry in stages[p]:
                shape = list(shapes[entry.canonical])
                spec = entry.spec
                if spec.vocab:
                    shape[0] = padded
                local = spec.local_shape(shape, lay.tp) if spec.axis == "tp" else tuple(shape)
                kind = name(tensor_dtype(entry.canonical, dtype))
                for e, key in entry.targets:
                    for t in range(lay.tp):
                        files[(p, e, t)].entries.append(PlannedEntry(key, local, kind))
        return Plan(target.fmt, lay, list(files.values()))
    chunks = dist_chunks(cfg, tensors, None, lay.spec, padded, dtype)
    keys: dict[str, PlannedEntry] = {}
    for c in chunks:
        keys.setdefault(c.key, PlannedEntry(c.key, c.global_shape, name(c.dtype)))
    if target.fmt == "zarr":
        return Plan(target.fmt, lay, [PlannedFile(str(folder / k), [e]) for k, e in keys.items()])
    return Plan(target.fmt, lay, [PlannedFile(str(folder), list(keys.values()))])
