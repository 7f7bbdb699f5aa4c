"""Any checkpoint as a stream of canonical tensors: detect its format (Hugging Face, legacy torch,
torch_dist, zarr), read its config and layout, and read each canonical tensor (global, unpadded)
on demand, in any layout; `load_checkpoint` fills a model of any layout from one (reshard on load)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mzoo.ckpt import dist as dist_fmt
from mzoo.ckpt import legacy
from mzoo.ckpt.assets import Assets, folder_assets, megatron_assets
from mzoo.ckpt.atomic import missing_note
from mzoo.ckpt.hf import CheckpointError, HFReader, is_hf_checkpoint
from mzoo.ckpt.layers import check_layer_count, dist_layers
from mzoo.ckpt.megatron.args import args_to_config, args_to_checkpoint, check_expert_tp
from mzoo.ckpt.megatron.bridge import read_run_config, run_config_to_args
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
from mzoo.ckpt.megatron.keys import dist_location, saved_spelling
from mzoo.ckpt.megatron.tracker import TRACKER, find_iteration_dir
from mzoo.ckpt.paths import hub_snapshot, inside
from mzoo.ckpt.sidecar import read_sidecar
from mzoo.ckpt.sink import TensorExtents, cat_rows
from mzoo.config import ModelConfig
from mzoo.converters.hf import read_config
from mzoo.errors import UserError
from mzoo.models.canonical import canonical_tensors, load_canonical
from mzoo.parallel.sharding import CanonicalTensor, ShardSpec


def detect_format(path: Path) -> str:
    path = hub_snapshot(Path(path))
    if not path.exists():
        note = missing_note(path)
        raise CheckpointError(f"{path} does not exist; {note or 'check the path'}.")
    if is_hf_checkpoint(path):
        return "hf"
    if path.is_dir() and (path / "config.json").exists():
        HFReader(path)  # raises the precise reason (no weights, pickled .bin, ...)
    try:
        folder, _ = find_iteration_dir(path)
    except CheckpointError:
        if (path / TRACKER).exists():
            raise  # the tracker is there and says why (damaged, or naming a missing iteration)
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


@dataclass
class Source:
    """Canonical tensors of one checkpoint, any format and layout."""

    path: Path
    fmt: str
    cfg: ModelConfig
    dtype: torch.dtype
    get: Callable[[str], torch.Tensor]
    megatron: Optional[MegatronCheckpoint] = None  # what a Megatron checkpoint records: layout, spelling, ...
    iteration: int | str = 0
    assets: Assets = field(default_factory=Assets)  # tokenizer, generation config, special ids
    files: dict[str, int] = field(default_factory=dict)
    tensors: list[CanonicalTensor] = field(default_factory=list)
    # a canonical tensor as extents of the source files (kernel copy), where the format allows it
    extents: Optional[Callable[[str], Optional[TensorExtents]]] = None
    quantization: Optional[str] = None  # how the stored weights are quantised ("mxfp4"); read dequantised

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
    """Every file of the checkpoint (what push uploads), none reached through a link out of it."""
    return {str(p.relative_to(root)): inside(root, p).stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _megatron_config(root: Path, args: Any, vocab_size: Optional[int]) -> ModelConfig:
    side = read_sidecar(root)
    if side and "model" in side:
        cfg = ModelConfig.from_dict(side["model"], where=str(root / "mzoo.yaml"))
    elif args is not None:
        cfg = args_to_config(args)
    else:
        raise CheckpointError(f"{root} carries neither mzoo.yaml, Megatron-LM args nor a Megatron-Bridge "
                              "run_config.yaml; mzoo cannot tell the architecture.")
    if vocab_size is not None:
        cfg = cfg.replace(vocab_size=vocab_size)
    return cfg


def _config_name(root: Path) -> str:
    """What a Megatron checkpoint's layer count was read from, for the sentence that refuses it."""
    side = read_sidecar(root)
    return str(root / "mzoo.yaml") if side and "model" in side else f"{root}'s Megatron args"


def _trim(spec: ShardSpec, value: torch.Tensor, vocab: int) -> torch.Tensor:
    return value[:vocab] if spec.vocab and value.shape[0] > vocab else value


def open_source(path: str | Path, trust_pickle: bool = False, vocab_size: Optional[int] = None) -> Source:
    path = hub_snapshot(Path(path))
    fmt = detect_format(path)
    if fmt == "hf":
        reader, adapter, cfg = read_config(path)
        first = reader.names()[0]
        dtype = reader.torch_dtype(first)
        # "release": what Megatron-LM's own converters write for weights without a training run
        # (Megatron-LM <= 0.15 refuses a tracker holding 0)
        return Source(path, fmt, cfg, dtype, lambda n: adapter.to_canonical(n, reader.get, cfg), iteration="release",
                      assets=folder_assets(path, reader.config), files=_files(path), tensors=canonical_tensors(cfg),
                      extents=lambda n: adapter.extents(n, reader, cfg), quantization=reader.quantization)
    folder, iteration = find_iteration_dir(path)
    root = folder.parent if folder != path else path
    if fmt == "torch":
        reader = legacy.LegacyReader(path, trust_pickle)
        cfg = _megatron_config(root, reader.args, vocab_size)
        check_layer_count(cfg.num_layers, reader.layer_count(), _config_name(root), "its rank files")
        tensors = canonical_tensors(cfg)
        specs = {t.name: t.spec for t in tensors}
        reader.bind(cfg.num_layers, specs, cfg.moe.num_experts if cfg.moe else 0)
        get = lambda n: _trim(specs[n], reader.get(n), cfg.vocab_size)  # noqa: E731
        return Source(path, fmt, cfg, reader.dtype, get, reader.megatron, iteration, megatron_assets(folder, read_sidecar(root)),
                      files=_files(folder), tensors=tensors)
    store = dist_fmt.DistReader(folder, trust_pickle) if fmt == "torch_dist" else _zarr_reader(folder, trust_pickle)
    common = store.common
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:  # Megatron-Bridge: the model provider's fields in run_config.yaml
        run = read_run_config(folder)
        args = run_config_to_args(run) if run is not None else None
    if args is not None:
        check_expert_tp(args)
    cfg = _megatron_config(root, args, vocab_size)
    check_layer_count(cfg.num_layers, dist_layers(store.keys(), store.shape), _config_name(root), f"its {fmt} files")
    tensors = canonical_tensors(cfg)
    specs = {t.name: t.spec for t in tensors}
    keys = set(store.keys())
    spelling = saved_spelling(keys, cfg)  # unless the args name the model's implementation
    megatron = args_to_checkpoint(args, None if "transformer_impl" in vars(args) else spelling) if args is not None \
        else MegatronCheckpoint(spelling=spelling)
    megatron = replace(megatron, iteration=iteration)
    where = {t.name: dist_location(t.name, t.spec, keys, cfg, megatron.spelling, folder) for t in tensors}  # before any read
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

    return Source(path, fmt, cfg, dtype, get, megatron, iteration, megatron_assets(folder, read_sidecar(root)),
                  files=_files(folder), tensors=tensors, extents=extents)


def _zarr_reader(folder: Path, trust_pickle: bool = False):
    from mzoo.ckpt import zarr as zarr_fmt

    return zarr_fmt.ZarrCheckpoint(folder, trust_pickle)


def load_checkpoint(model, path: str | Path, trust_pickle: bool = False) -> Source:
    """Fill this rank's model (any layout) from a checkpoint in any format and layout: reshard on load."""
    src = open_source(path, trust_pickle)
    diff = model.cfg.architecture_differences(src.cfg)
    if diff:
        raise UserError(f"{path} holds a different model ({', '.join(diff)} differ); pick the matching preset.")
    load_canonical(model, src.get)
    return src


def with_adapter(src: Source, adapter: Optional[str | Path]) -> Source:
    """`src` with a peft LoRA adapter merged into its weights (W + scaling B A per projection, as
    peft's merge_and_unload): what `convert --merge` writes and `generate --adapter` samples from."""
    if adapter is None:
        return src
    from mzoo.converters.peft import merged_getter, read_adapter

    lora, tensors = read_adapter(Path(adapter), src.cfg)
    return replace(src, get=merged_getter(src.cfg, lora, tensors, src.get), extents=None)
