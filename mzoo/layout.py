"""The one parallel layout: how a model is split over devices, used by the engine, the planner,
checkpoints (mzoo/ckpt/megatron/layout.py records the one a checkpoint was saved at) and the jobs.

Rank order follows Megatron: tp fastest, then cp, dp, pp; expert parallelism is carved out of the
dp x cp ranks (expert TP = TP unless `etp` says otherwise, as Megatron's expert_tensor_parallel_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mzoo.config import ConfigError, ModelConfig


@dataclass(frozen=True, kw_only=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B)
    dp: int = 1
    ep: int = 1
    cp: int = 1
    etp: Optional[int] = None  # expert tensor parallel: None = tp (mzoo's engine); 1 = Megatron's ETP1
    first_stage_layers: Optional[int] = None  # layers on the first / last pipeline stage (uneven splits)
    last_stage_layers: Optional[int] = None
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel size: experts are replicated tp * cp * dp / (etp * ep) times."""
        return self.tp * self.cp * self.dp // (self.expert_tp * self.ep)

    @property
    def mzoo_engine(self) -> bool:
        """Whether `mzoo train` runs this layout (its engine has expert TP = TP)."""
        return self.expert_tp == self.tp

    def sequence_problem(self, seq_len: int) -> Optional[str]:
        """Why sequences of `seq_len` tokens cannot be split by this layout, or None: context
        parallelism cuts them into 2 x cp equal chunks, sequence parallelism each rank's part into tp."""
        if self.cp > 1 and seq_len % (2 * self.cp):
            return (f"--seq-len {seq_len} is not divisible by 2 x cp = {2 * self.cp} (context parallelism cuts the "
                    f"sequence into 2 x cp equal chunks); choose a multiple of {2 * self.cp}.")
        if self.sequence_parallel and (seq_len // self.cp) % self.tp:
            what = f"--seq-len {seq_len}" if self.cp == 1 else f"--seq-len {seq_len} / cp {self.cp}"
            return (f"{what} is not divisible by TP={self.tp}, which sequence parallelism needs; choose a multiple of "
                    f"{self.tp * self.cp * (2 if self.cp > 1 else 1)}.")
        return None

    def key(self) -> tuple:
        return (self.tp, self.pp, self.vpp, self.ep, self.expert_tp, self.cp, self.dp)

    def label(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"vpp{self.vpp}"] if self.vpp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"etp{self.expert_tp}"] if self.expert_tp != self.tp else []
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts.append(f"dp{self.dp}")
        first, last = self.first_stage_layers, self.last_stage_layers
        if first is not None or last is not None:
            parts.append(f"(first {first or '-'}, last {last or '-'})")
        return " ".join(parts)

    def validate_for(self, cfg: ModelConfig) -> None:
        """One sentence for the first layout this model cannot take."""
        for name in ("tp", "pp", "vpp", "dp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        kinds = cfg.block_kinds
        if "attention" in kinds:
            if cfg.mla is None and cfg.groups % self.tp:
                raise ConfigError(
                    f"tensor parallel size {self.tp} does not divide the {cfg.groups} query groups of "
                    f"{cfg.name or 'this model'}; choose a TP that divides {cfg.groups}."
                )
            if cfg.num_attention_heads % self.tp:
                raise ConfigError(
                    f"tensor parallel size {self.tp} does not divide the {cfg.num_attention_heads} attention "
                    "heads; choose a TP that divides it."
                )
        if "mamba" in kinds and cfg.ssm.version == 2:
            dims = cfg.mamba_dims()
            if dims["nheads"] % self.tp or cfg.ssm.num_groups % self.tp:
                raise ConfigError(
                    f"tensor parallel size {self.tp} must divide the Mamba-2 heads ({dims['nheads']}) and "
                    f"groups ({cfg.ssm.num_groups}); choose a TP that divides both."
                )
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError("virtual pipeline stages (--vpp) need pipeline parallelism (--pp > 1).")
        if self.pp * self.vpp > cfg.num_layers:
            raise ConfigError(
                f"pipeline size {self.pp} x virtual stages {self.vpp} exceeds the {cfg.num_layers} layers; "
                "use fewer stages."
            )
        if self.cp > 1 and "mamba" in kinds:
            raise ConfigError(f"context parallelism (--cp {self.cp}) is for attention models; Mamba layers scan the "
                              "whole sequence in one rank; use --cp 1.")
        if self.cp > 1 and cfg.attention_dropout:
            raise ConfigError(f"context parallelism (--cp {self.cp}) has no attention dropout (its tiled attention "
                              f"draws none); set attention_dropout to 0 (now {cfg.attention_dropout}) or use --cp 1.")
        if cfg.moe is None and self.ep > 1:
            raise ConfigError(f"expert parallelism (--ep {self.ep}) needs a mixture-of-experts model; use --ep 1.")
        if cfg.moe is not None and cfg.moe.num_experts % self.ep:
            raise ConfigError(
                f"expert parallel size {self.ep} does not divide the {cfg.moe.num_experts} experts; "
                "choose an EP that divides it."
            )
