"""A parallel layout as the planner sees it: sizes of each parallel dimension and uneven pipeline ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mzoo.config import ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Rank order as Megatron's: tp fastest, then cp, dp, pp; EP carved out of the DP x CP ranks."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    ep: int = 1
    cp: int = 1
    etp: Optional[int] = None  # expert tensor parallel: None = tp (mzoo's engine); 1 = Megatron's ETP1
    first: Optional[int] = None  # layers on the first / last pipeline stage (uneven splits)
    last: Optional[int] = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        return self.tp * self.cp * self.dp // (self.expert_tp * self.ep)

    @property
    def mzoo_engine(self) -> bool:
        """Whether `mzoo train` runs this layout (its engine has expert TP = TP and no CP yet)."""
        return self.expert_tp == self.tp and self.cp == 1

    def parallel_config(self, sequence_parallel: bool = False) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, vpp=self.vpp, dp=self.dp, ep=self.ep, cp=self.cp,
                              sequence_parallel=sequence_parallel)

    def key(self) -> tuple:
        return (self.tp, self.pp, self.vpp, self.ep, self.expert_tp, self.cp, self.dp)

    def label(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"vpp{self.vpp}"] if self.vpp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"etp{self.expert_tp}"] if self.expert_tp != self.tp else []
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts.append(f"dp{self.dp}")
        if self.first is not None or self.last is not None:
            parts.append(f"(first {self.first or '-'}, last {self.last or '-'})")
        return " ".join(parts)
