"""How a Megatron checkpoint is laid out beyond the model: parallel sizes, spelling, vocab padding,
iteration; and the output a conversion aims at (format, layout, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from mzoo.config import ConfigError, ModelConfig, ParallelConfig
from mzoo.errors import UserError

Spelling = Literal["te", "local"]
FORMATS = ("hf", "torch", "torch_dist", "zarr")


@dataclass(frozen=True)
class MegatronLayout:
    """Everything about how a Megatron checkpoint is laid out, beyond the model itself."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    spec: Spelling = "te"
    make_vocab_size_divisible_by: int = 128
    iteration: int | str = 0
    ep: int = 1  # expert parallel size; expert TP is TP (Megatron's default expert_tensor_parallel_size)
    # legacy expert spelling: SequentialMLP `experts.local_experts.{i}.linear_fc1.weight` (False) or
    # TEGroupedMLP `experts.linear_fc1.weight{i}` (True); torch_dist keys are the same for both
    moe_grouped_gemm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep,
                              make_vocab_size_divisible_by=self.make_vocab_size_divisible_by)

    def padded_vocab(self, cfg: ModelConfig) -> int:
        return cfg.padded_vocab_size(self.tp, self.make_vocab_size_divisible_by)


@dataclass(frozen=True)
class Target:
    fmt: str
    layout: MegatronLayout = field(default_factory=MegatronLayout)
    dtype: Optional[torch.dtype] = None
    max_shard_bytes: int = 5 * 10**9


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
