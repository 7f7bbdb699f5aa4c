"""A model's canonical tensors (global, unpadded, Megatron names) from its config, read from a
meta model's ShardSpecs; filling a model from canonical tensors; Megatron-style random values."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from mzoo.ckpt.legacy import split_layer_name
from mzoo.config import ModelConfig
from mzoo.layout import Layout
from mzoo.models import meta_model
from mzoo.models.gpt import init_tensor
from mzoo.parallel.sharding import CanonicalTensor, get_spec, to_local
from mzoo.parallel.state import ParallelState


def canonical_tensors(cfg: ModelConfig) -> list[CanonicalTensor]:
    """Every canonical tensor of the model, with global (unpadded) shapes, in module order."""
    model = meta_model(cfg.replace(make_vocab_size_divisible_by=1), Layout())
    return [CanonicalTensor(n, tuple(p.shape), get_spec(p)) for n, p in model.named_parameters()]


def plan_tensors(cfg: ModelConfig) -> list[CanonicalTensor]:
    """canonical_tensors(cfg), fast for huge MoE models: a meta model of one layer of each kind
    (dense prefix, each MoE-period position) is built and its layers repeated, instead of
    building every expert of every layer."""
    moe = cfg.moe
    if moe is None or cfg.ssm is not None or cfg.num_layers <= _dense_template(cfg) + moe.layer_freq:
        return canonical_tensors(cfg)
    dense = _dense_template(cfg)
    small = cfg.replace(num_layers=dense + moe.layer_freq, **{"moe.first_k_dense": dense, "moe.dense_layers": []})
    listed = set(moe.dense_layers)
    template: dict[int, list[CanonicalTensor]] = {}
    head, tail = [], []
    for t in canonical_tensors(small):
        layer, rest = split_layer_name(t.name)
        if layer is None:
            (tail if template else head).append(t)
        else:
            template.setdefault(layer, []).append(CanonicalTensor(rest, t.shape, t.spec))
    out = list(head)
    for n in range(cfg.num_layers):
        kind = 0 if n < moe.first_k_dense or n in listed else dense + (n - moe.first_k_dense) % moe.layer_freq
        out += [CanonicalTensor(f"decoder.layers.{n}.{t.name}", t.shape, t.spec) for t in template[kind]]
    return out + tail


def _dense_template(cfg: ModelConfig) -> int:
    """1 when the model has dense layers outside the MoE period (a dense prefix or listed ones), else 0."""
    return int(cfg.moe.first_k_dense > 0 or bool(cfg.moe.dense_layers))


def one_layer_of_each_kind(cfg: ModelConfig) -> ModelConfig:
    """The same model with one layer of each kind (a dense prefix layer, each MoE-period position,
    each hybrid symbol) in the order they first occur: every distinct tensor shape and ShardSpec of
    `cfg`, from a meta model of a few layers whatever num_layers claims."""
    if cfg.ssm is not None and cfg.ssm.hybrid_pattern:
        pattern = "".join(dict.fromkeys(cfg.ssm.hybrid_pattern))
        return cfg.replace(num_layers=len(pattern), **{"ssm.hybrid_pattern": pattern})
    moe = cfg.moe
    if moe is not None and cfg.ssm is None:
        dense = _dense_template(cfg)
        if cfg.num_layers <= dense + moe.layer_freq:
            return cfg
        return cfg.replace(num_layers=dense + moe.layer_freq, **{"moe.first_k_dense": dense, "moe.dense_layers": []})
    return cfg.replace(num_layers=min(cfg.num_layers, 1))


def kind_tensors(cfg: ModelConfig) -> list[CanonicalTensor]:
    """The canonical tensors of one layer of each kind plus the embedding and head: what a check of
    every shape (TP divisibility, the largest tensor) needs, without listing 10M layers."""
    return canonical_tensors(one_layer_of_each_kind(cfg))


@torch.no_grad()
def load_canonical(model: nn.Module, fetch: Callable[[str], torch.Tensor]) -> None:
    """Fill this rank's parameters from canonical (global, unpadded) tensors, shard by ShardSpec
    (the base model's: LoRA adapters are not in base checkpoints; models/lora.py loads them)."""
    state: ParallelState = model.state
    for name, p in model.canonical_parameters():
        if getattr(p, "lora", False):
            continue
        try:
            p.copy_(to_local(p, fetch(name), state.tp, state.tp_rank))
        except ValueError as e:
            raise ValueError(f"{name}: {e}.") from None


def random_canonical(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron-style random init, one canonical tensor at a time (bounded memory)."""
    for t in canonical_tensors(cfg):
        yield t.name, init_tensor(cfg, t.name, t.shape, seed)
