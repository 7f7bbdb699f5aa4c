"""Weights that show a lost norm or bias.

A fresh model starts with every norm weight at 1 and every bias at 0 (`mzoo init`, Megatron and
transformers alike, and rightly so), so a loader that drops a norm or resets a bias hands back the
very tensors a test compares against: round trips and parity checks pass anyway. A test that saves
or compares moves every 1-D tensor first (norm weights, biases, router expert biases, Mamba's
A_log / D / dt_bias) by N(0, SCALE): norms become random values around 1, biases random nonzero ones.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable, Iterator

import torch

SCALE = 0.1


def noise(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """N(0, SCALE) drawn from (name, seed) alone: the same global values in every layout and process."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen) * SCALE


Named = tuple[str, torch.Tensor]


def informative(tensors: Iterable[Named], seed: int = 0) -> Iterator[Named]:
    """A canonical tensor stream (e.g. `random_canonical`) with every 1-D tensor moved by `noise`."""
    for name, t in tensors:
        yield name, (t + noise(name, tuple(t.shape), seed).to(t.dtype)) if t.dim() == 1 else t


def informative_init(preset: str, out: Path, seed: int = 0) -> Path:
    """What `mzoo init PRESET OUT --seed SEED` writes (fp32 Hugging Face folder, mzoo.yaml included),
    with informative norms and biases: the source a convert / reshard / verify test starts from."""
    from mzoo.converters.hf import save_hf
    from mzoo.models.canonical import random_canonical
    from mzoo.zoo import resolve

    cfg = resolve(preset)
    return save_hf(cfg, informative(random_canonical(cfg, seed), seed), out)


@torch.no_grad()
def perturb_model_(model: torch.nn.Module, seed: int = 0) -> None:
    """An mzoo model (any layout, after `init_weights`): every rank adds its ShardSpec shard of the same
    global noise, so the global model is the same whatever the layout (gated fc1 sections included)."""
    from mzoo.parallel.sharding import get_spec, to_local

    state = model.state
    for name, p in model.canonical_parameters():
        if p.dim() != 1:
            continue
        size = p.shape[0] * (state.tp if get_spec(p).axis == "tp" else 1)
        p.add_(to_local(p, noise(name, (size,), seed), state.tp, state.tp_rank).to(p.dtype))


@torch.no_grad()
def perturb_hf_(model: torch.nn.Module, moe: bool = False) -> None:
    """A transformers model, from torch's global RNG (seed it first): every 1-D parameter moved by
    N(0, SCALE); with `moe`, routers drawn from N(0, 0.5) so that they make clear choices (no near-ties
    between experts), DeepSeek's expert-score corrections (buffers) from N(0, SCALE), GPT-OSS's stacked
    expert biases ([E, n]) moved like 1-D ones and its attention sinks drawn from N(0, 1), so they matter."""
    for name, p in model.named_parameters():
        if name.endswith("self_attn.sinks"):
            p.normal_(0.0, 1.0)
        elif p.dim() == 1 or (name.endswith("_proj_bias") and p.dim() == 2):
            p.add_(torch.randn_like(p) * SCALE)
        elif moe and name.endswith(("gate.weight", "router.weight")):  # the router
            p.normal_(0.0, 0.5)
    if moe:
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, SCALE)
