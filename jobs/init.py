"""`mzoo init`: a randomly initialised model (Megatron-style init, one canonical tensor at a time)
written as a Hugging Face folder that AutoModelForCausalLM.from_pretrained loads."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mzoo.capacity import require_memory
from mzoo.ckpt.atomic import check_destination
from mzoo.ckpt.hf import parse_dtype, parse_size
from mzoo.converters import for_family
from mzoo.converters.hf import save_hf
from mzoo.models.canonical import kind_tensors, random_canonical
from mzoo.params import count_params
from mzoo.zoo import resolve


@dataclass(frozen=True)
class InitRequest:
    preset: str  # zoo preset name or model YAML
    out: Path
    seed: int = 0
    dtype: str = "fp32"
    shard_size: str = "5GB"
    overwrite: bool = False


@dataclass(frozen=True)
class InitResult:
    path: str
    preset: str
    params: int
    dtype: str
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def init(req: InitRequest) -> InitResult:
    cfg = resolve(req.preset)
    torch_dtype = parse_dtype(req.dtype)
    max_bytes = parse_size(req.shard_size)
    for_family(cfg.family).config_to_hf(cfg)  # fail before any work if HF cannot express it
    largest = max(kind_tensors(cfg), key=lambda t: math.prod(t.shape))  # made in fp32, then cast: one at a time
    require_memory(math.prod(largest.shape) * (4 + torch_dtype.itemsize), torch.device("cpu"),
                   f"initialising {largest.name} of shape {'x'.join(map(str, largest.shape))}",
                   "check the sizes in the preset (hidden_size, ffn_hidden_size, vocab_size)")
    check_destination(req.out, req.overwrite, need_bytes=count_params(cfg).total * torch_dtype.itemsize)
    save_hf(cfg, random_canonical(cfg, req.seed), req.out, dtype=torch_dtype, max_shard_bytes=max_bytes,
            overwrite=req.overwrite)
    return InitResult(str(req.out), cfg.name, count_params(cfg).total, req.dtype, req.seed)
