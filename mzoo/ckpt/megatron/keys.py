"""Where canonical tensors live in torch_dist / zarr checkpoints: megatron-core's keys (stacked or
per layer, experts on a global axis, Mamba mixer sections as separate keys), and the chunks a
writer produces for them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mzoo.ckpt import dist as dist_fmt
from mzoo.ckpt.hf import CheckpointError, storage_dtype
from mzoo.ckpt.legacy import split_layer_name
from mzoo.ckpt.megatron.checkpoint import Spelling
from mzoo.ckpt.megatron.names import dist_spelling, expert_dist_key, split_sections, to_spelling
from mzoo.ckpt.sink import TensorExtents
from mzoo.config import ModelConfig
from mzoo.parallel.sharding import CanonicalTensor, ShardSpec, pad_vocab


def saved_spelling(keys: set[str], cfg: ModelConfig) -> Spelling:
    """The spelling (te or local) a torch_dist/zarr checkpoint was saved with, told by its keys where they differ:
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
    return cfg.moe is not None and (cfg.moe.first_k_dense > 0 or cfg.moe.layer_freq > 1 or bool(cfg.moe.dense_layers))


def dist_key(name: str, cfg: ModelConfig, spelling: Spelling, stacked: bool) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """Canonical name -> (torch_dist key, index on its leading axes, sizes of those axes).

    Stacked: `decoder.layers.<name>` [L, ...]; per layer: `decoder.layers.{N}.<name>`; experts add
    a global expert axis under `...mlp.experts.experts.<linear>` ([L, E, ...] or [E, ...])."""
    layer, rest = split_layer_name(name)
    mla, hybrid = cfg.mla is not None, cfg.ssm is not None
    if layer is None:
        return dist_spelling(name, spelling, mla, hybrid), (), ()
    rest, expert = expert_dist_key(rest)
    rest = dist_spelling(rest, spelling, mla, hybrid)
    experts = ((expert,), (cfg.moe.num_experts,)) if expert is not None else ((), ())
    if stacked:
        return "decoder.layers." + rest, (layer, *experts[0]), (cfg.num_layers, *experts[1])
    return f"decoder.layers.{layer}.{rest}", experts[0], experts[1]


def dist_location(name: str, shard: ShardSpec, keys: set[str], cfg: ModelConfig, spelling: Spelling,
                  folder: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Where a canonical tensor is in a torch_dist/zarr checkpoint, as (key, index) parts to
    concatenate (one part, or a Mamba mixer tensor's sections): the layout's spelling first,
    stacked or per layer, whichever the checkpoint has."""
    other: Spelling = "local" if spelling == "te" else "te"
    tries = [dist_key(name, cfg, s, stacked) for s in (spelling, other) for stacked in (not non_homogeneous(cfg),
                                                                                   non_homogeneous(cfg))]
    layer, rest = split_layer_name(name)
    if cfg.ssm is not None and layer is not None:  # megatron's local Mamba spec saved without its TE remapping
        tries.append((f"decoder.layers.{layer}.{to_spelling(rest, 'local')}", (), ()))
    sections = split_sections(name, shard) or ()
    for key, index, _ in tries:
        parts = [f"{key}.{s}" for s in sections] or [key]
        if all(p in keys for p in parts):
            return [(p, index) for p in parts]
    first = tries[0][0] + (f".{sections[0]}" if sections else "")
    raise CheckpointError(f"{folder} has no tensor {first} (for {name}); the checkpoint does not match its config.")


def dist_chunks(cfg: ModelConfig, tensors: list[CanonicalTensor], fetch: Optional[Callable[[str], torch.Tensor]],
                spelling: Spelling, padded: int, dtype: torch.dtype,
                extents: Optional[Callable[[str], Optional[TensorExtents]]] = None) -> list[dist_fmt.Chunk]:
    """One chunk per canonical tensor (per layer of a stacked key, per expert of an expert key),
    under the keys megatron-core uses for `spelling` (see dist_key); vocab rows padded. `fetch` None
    plans without weights."""
    chunks = []
    stacked = not non_homogeneous(cfg)
    for t in tensors:
        key, index, lead = dist_key(t.name, cfg, spelling, stacked)
        shape = list(t.shape)
        if t.spec.vocab:
            shape[0] = padded
        sections = split_sections(t.name, t.spec)
        if sections:
            chunks += _section_chunks(key, t, sections, fetch, storage_dtype(t.name, dtype))
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
                                     storage_dtype(t.name, dtype), produce, prepend=len(lead), extents=where))
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


def dist_objects(cfg: ModelConfig) -> dict[str, Any]:
    """ShardedObjects (unique key -> data) beyond the decoder's `_extra_state`: megatron-core's
    MambaModel (unlike GPTModel, which drops it) declares its output layer's, tied or not."""
    return {"output_layer._extra_state/shard_0_1": None} if cfg.ssm is not None else {}
