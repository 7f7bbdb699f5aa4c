"""Hugging Face <-> canonical, tensor by tensor: read a checkpoint's config, load into an mzoo model, save.

Canonical tensors come from (or go to) the family adapter's mapping table; which canonical
tensors exist and how they split comes from a model built on the meta device.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from mzoo.ckpt.assets import GENERATION, Assets, generation_config, write_special
from mzoo.ckpt.atomic import atomic_dir
from mzoo.ckpt.hf import HFReader, HFWriter, dtype_name, storage_dtype, write_json
from mzoo.ckpt.layers import check_layer_count, held_layers
from mzoo.ckpt.sidecar import write_sidecar
from mzoo.ckpt.sink import TensorExtents
from mzoo.config import ModelConfig
from mzoo.converters import adapter as adapters
from mzoo.models import build_model
from mzoo.models.canonical import canonical_tensors, load_canonical
from mzoo.parallel.state import ParallelState


def read_config(path: str | Path) -> tuple[HFReader, adapters.Adapter, ModelConfig]:
    reader = HFReader(path)
    adapter = adapters.for_hf_config(reader.config)
    cfg = adapter.config_from_hf(reader.config)
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in reader.config), "num_hidden_layers")
    extra = reader.config.get("num_nextn_predict_layers") or 0  # DeepSeek's MTP layers, ignored on read
    check_layer_count(cfg.num_layers, held_layers(reader.names()), str(Path(path) / "config.json"),
                      "its weight files", extra if isinstance(extra, int) else 0, key)
    cfg.validate(str(path))
    return reader, adapter, cfg


def load_hf_model(
    path: str | Path, state: Optional[ParallelState] = None, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, nn.Module]:
    """An mzoo model (this rank's part) holding the weights of a Hugging Face checkpoint."""
    reader, adapter, cfg = read_config(path)
    model = build_model(cfg, state, dtype=dtype)
    load_canonical(model, lambda name: adapter.to_canonical(name, reader.get, cfg))
    return cfg, model


def save_hf(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor | TensorExtents]],
    out: str | Path,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 5 * 10**9,
    assets: Assets = Assets(),
    overwrite: bool = False,
) -> Path:
    """Write canonical tensors as a Hugging Face checkpoint that from_pretrained loads. A tensor
    may come as extents of another checkpoint's files (in `dtype`): its bytes are copied by the kernel.
    `assets`: the tokenizer files, generation config and special ids that travel with the weights."""
    adapter = adapters.for_family(cfg.family)
    hf_config = adapter.config_to_hf(cfg)  # fails on configs HF cannot express, before any work
    out = Path(out)
    tensors = iter(tensors)
    first = next(tensors, None)
    if first is None:
        raise ValueError("no tensors to write")
    dtype = dtype or first[1].dtype
    plan = hf_plan(cfg, adapter, dtype)
    with atomic_dir(out, overwrite) as tmp:
        writer = HFWriter(tmp, plan, max_shard_bytes)
        try:
            for name, tensor in itertools.chain([first], tensors):
                if isinstance(tensor, TensorExtents):
                    parts = adapter.hf_extents(name, tensor, cfg)
                    if parts is None:
                        raise ValueError(f"{name}: extents given for a tensor whose mapping cannot use them")
                else:
                    parts = adapter.to_hf(name, tensor.to(storage_dtype(name, dtype)), cfg)
                for hf_name, value in parts:
                    writer.add(hf_name, value)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        config = {**write_special(hf_config, assets), **dtype_keys(dtype), "transformers_version": _tf_version()}
        write_json(tmp / "config.json", config)
        write_json(tmp / GENERATION, generation_config(assets))
        for file in assets.tokenizer_files:
            shutil.copy2(file, tmp / Path(file).name)
        write_sidecar(tmp, cfg, "hf", dtype_name(dtype))
    return out


def dtype_keys(dtype: torch.dtype) -> dict[str, str]:
    """config.json's dtype in both spellings: `dtype` (read by transformers 5 and 4.57) and `torch_dtype`
    (4.x before the rename; 4.57 and 5 keep `dtype` when both are there and drop the other silently)."""
    return {"dtype": dtype_name(dtype), "torch_dtype": dtype_name(dtype)}


def _tf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "5.0.0"


def hf_plan(cfg: ModelConfig, adapter: adapters.Adapter, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF name, shape, dtype) of every output tensor, in write order, from a meta-device pass."""
    plan = []
    for t in canonical_tensors(cfg):
        kept = storage_dtype(t.name, dtype)
        for hf_name, value in adapter.to_hf(t.name, torch.empty(t.shape, dtype=kept, device="meta"), cfg):
            plan.append((hf_name, tuple(value.shape), kept))
    return plan


