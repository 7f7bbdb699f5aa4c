"""ParallelState: this process's place in the layout, and its process groups.

Built from a Layout and passed to model code explicitly (no globals). Rank order follows
Megatron-Core: tp varies fastest, then cp, then dp, then pp, so global rank
r = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank)) and legacy rank files map one to one.

Expert parallelism (Megatron-Core, expert TP = TP) re-reads the dp x cp ranks of one (tp, pp) position
as ep x edp with ep fastest: d = cp_rank + cp * dp_rank, ep_rank = d % ep, edp_rank = d // ep. Routed
experts are split over the EP group and replicated over the expert-data-parallel (EDP) group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from mzoo.config import ConfigError
from mzoo.layout import Layout
from mzoo.parallel.random import RNGTracker

Group = Optional[dist.ProcessGroup]


@dataclass
class ParallelState:
    config: Layout = field(default_factory=Layout)
    rank: int = 0
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0  # expert-parallel rank: which slice of the routed experts this rank holds
    edp_rank: int = 0  # expert-data-parallel rank: which replica of those experts
    tp_group: Group = None
    cp_group: Group = None
    dp_group: Group = None
    pp_group: Group = None
    dp_cp_group: Group = None  # same tp, pp: dense gradients and the loss are reduced over dp x cp (Megatron's)
    ep_group: Group = None  # same tp, pp, edp rank: exchanges tokens (all-to-all)
    edp_group: Group = None  # same tp, pp, ep rank: reduces expert gradients
    pp_ranks: tuple[int, ...] = (0,)  # global ranks of this pipeline, by stage
    embedding_group: Group = None  # first + last stage of this pipeline (tied embeddings)
    rng: RNGTracker = field(default_factory=RNGTracker)  # TP-aware dropout streams
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's model and data

    def __post_init__(self) -> None:
        self.rng.device = self.device  # the dropout streams live where the activations do

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def dp(self) -> int:
        return self.config.dp

    @property
    def cp(self) -> int:
        return self.config.cp

    @property
    def dp_cp(self) -> int:
        return self.config.dp * self.config.cp

    @property
    def dp_cp_rank(self) -> int:
        """Rank in the dp x cp group (its ranks in global order: cp fastest)."""
        return self.cp_rank + self.config.cp * self.dp_rank

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def expert_dp(self) -> int:
        return self.config.expert_dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.config.pp - 1

    @classmethod
    def single(cls, config: Optional[Layout] = None, device: Optional[torch.device] = None) -> "ParallelState":
        """One process holding everything; `config` may still say tp/pp for shapes (meta models)."""
        return cls(config=config or Layout(), device=torch.device(device or "cpu"))

    @classmethod
    def for_rank(cls, config: Layout, rank: int) -> "ParallelState":
        """Coordinates of `rank` without process groups: for sizing shards and naming rank files."""
        tp_rank, rest = rank % config.tp, rank // config.tp
        cp_rank, rest = rest % config.cp, rest // config.cp
        dp_rank, pp_rank = rest % config.dp, rest // config.dp
        check_expert_layout(config)
        d = cp_rank + config.cp * dp_rank
        return cls(config=config, rank=rank, tp_rank=tp_rank, cp_rank=cp_rank, dp_rank=dp_rank, pp_rank=pp_rank,
                   ep_rank=d % config.ep, edp_rank=d // config.ep)

    @classmethod
    def build(cls, config: Layout, device: Optional[torch.device] = None) -> "ParallelState":
        """Create every process group (all ranks must call this, in the same order); `device` is
        where this rank's model, data and collectives live (its GPU, or the CPU)."""
        world = dist.get_world_size()
        if config.world_size != world:
            raise ValueError(
                f"the layout tp={config.tp} x cp={config.cp} x dp={config.dp} x pp={config.pp} needs "
                f"{config.world_size} processes but {world} were started; make the product match."
            )
        me = cls.for_rank(config, dist.get_rank())
        me.device = torch.device(device or "cpu")
        me.rng.device = me.device
        coords = {
            r: (s.tp_rank, s.cp_rank, s.dp_rank, s.pp_rank)
            for r in range(world)
            for s in [cls.for_rank(config, r)]
        }
        made: dict[tuple[int, ...], Group] = {}  # rank sets already created, reused by the expert axes
        axes = {"tp": 0, "cp": 1, "dp": 2, "pp": 3}
        for name, axis in axes.items():
            keys = sorted({tuple(c[:axis] + c[axis + 1 :]) for c in coords.values()})
            for key in keys:
                ranks = [r for r, c in coords.items() if tuple(c[:axis] + c[axis + 1 :]) == key]
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                made[tuple(ranks)] = group
                if me.rank in ranks:
                    setattr(me, f"{name}_group", group)
                    if name == "pp":
                        me.pp_ranks = tuple(ranks)
                if name == "pp" and len(ranks) > 1:  # every rank creates every group, in order
                    pair = dist.new_group([ranks[0], ranks[-1]])
                    if me.rank in (ranks[0], ranks[-1]):
                        me.embedding_group = pair
        for pp_rank in range(config.pp):  # dp x cp: every (tp, pp) position, in an order all ranks share
            for tp_rank in range(config.tp):
                ranks = [r for r, c in coords.items() if (c[0], c[3]) == (tp_rank, pp_rank)]
                if tuple(ranks) not in made:  # with cp 1 these are the DP groups
                    made[tuple(ranks)] = dist.new_group(ranks) if len(ranks) > 1 else None
                if me.rank in ranks:
                    me.dp_cp_group = made[tuple(ranks)]
        for name, ranks in expert_group_ranks(config, world):
            key = tuple(ranks)
            if key not in made:  # e.g. with ep 1 and cp 1 the EDP groups are the DP groups
                made[key] = dist.new_group(ranks) if len(ranks) > 1 else None
            if me.rank in ranks:
                setattr(me, f"{name}_group", made[key])
        if me.pp_group is not None and me.device.type == "cuda":
            # NCCL wants a group's first operation to involve all of its ranks before batched p2p: a
            # CUDA collective (a barrier would run on the group's gloo side, leaving NCCL cold)
            dist.all_reduce(torch.zeros(1, device=me.device), group=me.pp_group)
        return me


def check_expert_layout(config: Layout) -> None:
    """EP groups are carved out of the data-parallel x context-parallel ranks: ep must divide them."""
    if config.ep < 1 or (config.dp * config.cp) % config.ep:
        raise ConfigError(
            f"expert parallel size {config.ep} must divide data parallel x context parallel "
            f"({config.dp} x {config.cp}); choose an EP that divides {config.dp * config.cp}."
        )


def expert_group_ranks(config: Layout, world: int) -> list[tuple[str, list[int]]]:
    """Every EP group, then every EDP group, as (axis name, ranks), in an order all ranks share.
    EP: same tp, pp and edp rank; EDP: same tp, pp and ep rank (Megatron's expert rank generator)."""
    coords = {r: ParallelState.for_rank(config, r) for r in range(world)}
    out = []
    for name, key in (("ep", lambda s: (s.pp_rank, s.edp_rank, s.tp_rank)),
                      ("edp", lambda s: (s.pp_rank, s.ep_rank, s.tp_rank))):
        for k in sorted({key(s) for s in coords.values()}):
            out.append((name, [r for r, s in coords.items() if key(s) == k]))
    return out
