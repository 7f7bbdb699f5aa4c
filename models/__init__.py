"""Model definitions built from mzoo.parallel blocks, one module per family or block."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from mzoo.config import ConfigError, ModelConfig
from mzoo.layout import Layout
from mzoo.models.gpt import GPTModel
from mzoo.models.hybrid import MambaModel
from mzoo.parallel.state import ParallelState

# The families mzoo builds: one decoder (GPTModel) for all of them; a config with an `ssm` section is a
# Mamba (or hybrid) model whatever its family.
BUILDABLE_FAMILIES = ("gpt", "llama", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek", "mamba", "gpt_oss")


def model_class(cfg: ModelConfig) -> Callable[..., nn.Module]:
    if cfg.ssm is not None:
        return MambaModel
    if cfg.family == "mamba":
        raise ConfigError(f"{cfg.name or cfg.family}: a mamba model needs an ssm section; add one or start "
                          "from a mamba preset.")
    if cfg.family not in BUILDABLE_FAMILIES:
        raise ConfigError(
            f"{cfg.name or cfg.family}: mzoo cannot build {cfg.family} models yet (only "
            f"{', '.join(BUILDABLE_FAMILIES)}); use a preset of those families."
        )
    return GPTModel


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


class ModelChunks(nn.ModuleList):
    """This rank's model chunks: one per virtual pipeline stage (a single chunk without VPP)."""

    def __init__(self, chunks: list[nn.Module], cfg: ModelConfig, state: ParallelState):
        super().__init__(chunks)
        self.cfg, self.state = cfg, state

    def canonical_parameters(self):
        for chunk in self:
            yield from chunk.canonical_parameters()

    def init_weights(self, seed: int = 0) -> None:
        for chunk in self:
            chunk.init_weights(seed)

    def compile_layers(self) -> None:
        for chunk in self:
            chunk.compile_layers()

    def set_recompute(self, mode: str, modules: tuple[str, ...] = (), num_layers: Optional[int] = None) -> None:
        for chunk in self:
            chunk.set_recompute(mode, modules, num_layers)


def build_chunks(cfg: ModelConfig, state: ParallelState, dtype: Optional[torch.dtype] = None,
                 device: Optional[str | torch.device] = None) -> ModelChunks:
    """The chunks this pipeline rank holds, with Megatron's (interleaved, possibly uneven: the layout's
    first/last stage layers) layer assignment, built directly on the rank's device (`state.device`, or
    `device`: 'meta' for shapes only): parameters are allocated there uninitialised, so a GPU rank
    never holds its model in host memory; `init_weights` or a checkpoint fills them."""
    from mzoo.parallel.pipeline import stage_layers

    lay = state.config
    ranges = stage_layers(cfg.num_layers, state.pp, lay.vpp, lay.first_stage_layers, lay.last_stage_layers)[state.pp_rank]
    vpp = len(ranges)
    cls = model_class(cfg)
    with torch.device(device or state.device):
        chunks = [
            cls(cfg, state, layers=r, dtype=dtype,
                pre_process=state.is_first_stage and v == 0, post_process=state.is_last_stage and v == vpp - 1)
            for v, r in enumerate(ranges)
        ]
    return ModelChunks(chunks, cfg, state)


def meta_model(cfg: ModelConfig, parallel: Optional[Layout] = None) -> nn.Module:
    """The global model (all layers, rank 0 of the given TP) on the meta device."""
    return build_model(cfg, ParallelState.single(parallel), device="meta")
