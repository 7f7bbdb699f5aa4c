"""What one training run asks of a layout: sequence, batch, recomputation, optimizer sharding; and the defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from mzoo.config import ModelConfig
from mzoo.layout import Layout
from mzoo.plan.constants import HEADROOM, TOKENS_PER_BATCH
from mzoo.plan.profile import Profile


@dataclass(frozen=True)
class Settings:
    seq_len: int
    global_batch: int
    micro_batch: int = 1
    recompute: str = "none"  # none, selective, full
    distributed_optimizer: bool = True
    fp8: bool = False
    grad_fp32: bool = True  # Megatron's main grads in fp32 (Megatron-LM forces it for bf16)
    gpus_per_node: int = 8
    headroom: float = HEADROOM  # of each GPU's memory kept free
    recompute_modules: Optional[frozenset] = None  # selective: what is recomputed (default: the profile's)
    recompute_layers: Optional[int] = None  # full: the first N layers of each chunk (default all)
    lora_rank: int = 0  # LoRA: the base is frozen and only adapters of this rank on `lora_parts` train
    lora_parts: frozenset = frozenset()

    def microbatches(self, layout: Layout) -> int:
        return self.global_batch // (self.micro_batch * layout.dp)

    def tokens(self, layout: Layout) -> int:
        """Tokens of one micro-batch on one context-parallel rank (T in docs/plan.md)."""
        return self.micro_batch * self.seq_len // layout.cp


def default_seq_len(cfg: ModelConfig) -> int:
    return min(4096, cfg.max_position_embeddings)


def default_global_batch(seq_len: int) -> int:
    """About TOKENS_PER_BATCH tokens, as a power of two (Llama 3: 512 x 8192; DeepSeek-V3 more)."""
    return 2 ** max(0, round(math.log2(TOKENS_PER_BATCH / seq_len)))


def recomputed_modules(profile: Profile, settings: Settings) -> frozenset:
    """What selective recomputation redoes: the run's choice, else the profile's default; nothing otherwise."""
    if settings.recompute != "selective":
        return frozenset()
    return settings.recompute_modules if settings.recompute_modules is not None else profile.selective
