"""Numerical parity between mzoo and transformers on the same checkpoint and token batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mzoo.converters.hf import load_hf_model

TOLERANCE = 1e-4  # fp32 max |Δlogits| that counts as "the same model"


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    argmax_agreement: float
    tokens: int

    @property
    def match(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def against_transformers(path: str | Path, batch: int = 2, seq: int = 32) -> Parity:
    """Run the HF checkpoint at `path` in transformers and in mzoo (fp32) and compare logits."""
    from transformers import AutoModelForCausalLM

    cfg, ours = load_hf_model(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = sample_tokens(cfg.vocab_size, batch, min(seq, cfg.max_position_embeddings))
    a = ref(ids).logits[..., : cfg.vocab_size]
    b = ours.eval()(ids)
    return Parity(
        max_abs_diff=(a - b).abs().max().item(),
        argmax_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        tokens=ids.numel(),
    )
