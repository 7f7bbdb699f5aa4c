"""What a Megatron checkpoint records beyond the model (the layout it was saved at, spelling, vocab
padding, iteration), and the output a conversion aims at (format, checkpoint layout, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from mzoo.config import ConfigError, ModelConfig
from mzoo.errors import UserError
from mzoo.layout import Layout

Spelling = Literal["te", "local"]
FORMATS = ("hf", "torch", "torch_dist", "zarr")


@dataclass(frozen=True)
class MegatronCheckpoint:
    """What a Megatron checkpoint records beyond the model: the layout it was saved at (TP, PP, VPP,
    EP, uneven stage ends; expert TP is TP, Megatron's default), its parameter spelling, the vocabulary
    padding divisor, the iteration, and how legacy files name experts."""

    layout: Layout = field(default_factory=Layout)
    spelling: Spelling = "te"  # te (Transformer Engine) or local parameter names
    make_vocab_size_divisible_by: int = 128
    iteration: int | str = 0
    # legacy expert spelling: SequentialMLP `experts.local_experts.{i}.linear_fc1.weight` (False) or
    # TEGroupedMLP `experts.linear_fc1.weight{i}` (True); torch_dist keys are the same for both
    moe_grouped_gemm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def padded_vocab(self, cfg: ModelConfig) -> int:
        return cfg.padded_vocab_size(self.layout.tp, self.make_vocab_size_divisible_by)


@dataclass(frozen=True)
class Target:
    fmt: str
    megatron: MegatronCheckpoint = field(default_factory=MegatronCheckpoint)
    dtype: Optional[torch.dtype] = None
    max_shard_bytes: int = 5 * 10**9


def validate_layout(cfg: ModelConfig, fmt: str, lay: MegatronCheckpoint) -> None:
    """Every reason `cfg` cannot take this Megatron layout, in one sentence."""
    from mzoo.parallel.pipeline import stage_layers

    if lay.spelling not in ("te", "local"):
        raise UserError(f"unknown spec '{lay.spelling}'; use te or local.")
    par = lay.layout
    par.validate_for(cfg)
    stage_layers(cfg.num_layers, par.pp, par.vpp, par.first_stage_layers, par.last_stage_layers)
    ssm = cfg.ssm
    if ssm is not None and ssm.version == 1 and cfg.mamba_dims()["d_inner"] % par.tp:
        raise ConfigError(f"tensor parallel size {par.tp} does not divide the Mamba inner size "
                          f"({cfg.mamba_dims()['d_inner']}); choose a TP that divides it.")
    mla = cfg.mla
    if fmt == "torch" and lay.spelling == "local" and mla is not None and par.tp > 1:
        # megatron-core's local MLA spec splits the latent down projections' rows over TP
        rows = {"q_lora_rank": mla.q_lora_rank, "kv_lora_rank + qk_rope_head_dim": mla.kv_lora_rank + mla.qk_rope_head_dim}
        for what, n in rows.items():
            if n is not None and n % par.tp:
                raise ConfigError(f"tensor parallel size {par.tp} does not divide {what} ({n}), which megatron-core's "
                                  "local MLA spec splits over TP; use --spec te or a TP that divides it.")
