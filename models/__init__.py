"""Model definitions built from mzoo.parallel blocks, one module per family or block."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from mzoo.config import ConfigError, ModelConfig, ParallelConfig
from mzoo.parallel.state import ParallelState
from mzoo.models.gpt import GPTModel

# family -> model class; MoE, MLA and Mamba families register here as their modules land.
MODEL_CLASSES: dict[str, Callable[..., nn.Module]] = {"gpt": GPTModel, "llama": GPTModel}


def model_class(cfg: ModelConfig) -> Callable[..., nn.Module]:
    if cfg.moe is not None or cfg.mla is not None or cfg.ssm is not None or cfg.family not in MODEL_CLASSES:
        raise ConfigError(
            f"{cfg.name or cfg.family}: mzoo cannot build {cfg.family} models yet (only "
            f"{', '.join(MODEL_CLASSES)}); use a preset of those families."
        )
    return MODEL_CLASSES[cfg.family]


def build_model(
    cfg: ModelConfig,
    state: Optional[ParallelState] = None,
    layers: Optional[range] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """This rank's model; `device='meta'` gives shapes and ShardSpecs without memory."""
    cls = model_class(cfg)
    with torch.device(device):
        return cls(cfg, state or ParallelState.single(), layers=layers, dtype=dtype)


def meta_model(cfg: ModelConfig, parallel: Optional[ParallelConfig] = None) -> nn.Module:
    """The global model (all layers, rank 0 of the given TP) on the meta device."""
    return build_model(cfg, ParallelState.single(parallel), device="meta")
