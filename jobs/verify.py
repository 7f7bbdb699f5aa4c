"""Are two checkpoints the same model? Compare every canonical tensor, one at a time (a random token
batch reads only a few embedding rows, so a corrupted row elsewhere would pass), and run both on one
token batch and compare logits.

Both sides run in mzoo's engine in fp32 (any format, any layout: tensors are merged to the
canonical form first), or one side in transformers itself (`against_transformers`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from mzoo.capacity import require_memory
from mzoo.converters.hf import load_hf_model
from mzoo.errors import UserError
from mzoo.jobs.sources import open_source
from mzoo.models import build_model
from mzoo.models.canonical import load_canonical
from mzoo.params import count_params, human
from mzoo.tolerances import VERIFY_TOLERANCE



@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    mean_kl: float
    argmax_agreement: float
    tokens: int
    tolerance: float = VERIFY_TOLERANCE
    tensors: int = 0  # canonical tensors compared directly (0: logits only)
    max_tensor_diff: float = 0.0  # largest |a - b| over every element of those tensors (fp32)
    worst_tensor: Optional[str] = None

    @property
    def match(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.max_tensor_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "match": self.match}


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def compare_logits(a: torch.Tensor, b: torch.Tensor, tolerance: float = VERIFY_TOLERANCE) -> Comparison:
    a, b = a.float(), b.float()
    kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
    return Comparison(
        max_abs_diff=(a - b).abs().max().item(),
        mean_kl=kl.mean().item(),
        argmax_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        tokens=a.shape[0] * a.shape[1],
        tolerance=tolerance,
    )


@torch.no_grad()
def source_logits(src, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a mzoo.jobs.sources.Source, run by mzoo in one process in fp32."""
    model = build_model(src.cfg, dtype=torch.float32)
    load_canonical(model, lambda name: src.get(name).float())
    return model.eval()(ids)


@dataclass(frozen=True)
class TensorDiff:
    tensors: int
    max_diff: float
    worst: Optional[str]


@torch.no_grad()
def compare_tensors(a, b) -> TensorDiff:
    """Every canonical tensor of two sources, streamed one pair at a time (memory: two tensors), in
    fp32; a tensor one side lacks or shapes differently counts as an infinite difference."""
    shapes_b = {t.name: t.shape for t in b.tensors}
    worst, largest = None, 0.0
    for t in a.tensors:
        diff = float("inf") if shapes_b.get(t.name) != t.shape else \
            (a.get(t.name).float() - b.get(t.name).float()).abs().max().item() if math.prod(t.shape) else 0.0
        diff = float("inf") if math.isnan(diff) else diff  # NaN on one side is a difference
        if diff > largest:
            worst, largest = t.name, diff
    if set(shapes_b) - {t.name for t in a.tensors}:
        worst, largest = sorted(set(shapes_b) - {t.name for t in a.tensors})[0], float("inf")
    return TensorDiff(len(a.tensors), largest, worst)


def check_memory(a, b, tokens: int) -> None:
    """Both sides run one after the other in fp32: the larger model and its logits must fit, checked
    before either is built."""
    big = max((a, b), key=lambda s: count_params(s.cfg).total)
    need = count_params(big.cfg).total * 4 + 2 * tokens * big.cfg.padded_vocab_size() * 4
    require_memory(need, torch.device("cpu"), f"running {big.path} ({human(count_params(big.cfg).total)} parameters "
                   "in fp32)", "check the sizes in its config (hidden_size, ffn_hidden_size, vocab_size, "
                   "num_layers) or run on a machine with more memory")


def verify_sources(a, b, batch: int = 2, seq: int = 32, seed: int = 0, tolerance: float = VERIFY_TOLERANCE) -> Comparison:
    if a.cfg.vocab_size != b.cfg.vocab_size:
        raise UserError(
            f"the checkpoints have different vocabularies ({a.cfg.vocab_size} vs {b.cfg.vocab_size}); "
            "pass --vocab-size if one of them only records its padded size."
        )
    seq = min(seq, a.cfg.max_position_embeddings, b.cfg.max_position_embeddings)
    check_memory(a, b, batch * seq)
    ids = sample_tokens(a.cfg.vocab_size, batch, seq, seed)
    logits = compare_logits(source_logits(a, ids), source_logits(b, ids), tolerance)
    tensors = compare_tensors(a, b)
    return replace(logits, tensors=tensors.tensors, max_tensor_diff=tensors.max_diff, worst_tensor=tensors.worst)


@torch.no_grad()
def against_transformers(path: str | Path, batch: int = 2, seq: int = 32) -> Comparison:
    """Run the HF checkpoint at `path` in transformers and in mzoo (fp32) and compare logits."""
    from transformers import AutoModelForCausalLM

    cfg, ours = load_hf_model(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = sample_tokens(cfg.vocab_size, batch, min(seq, cfg.max_position_embeddings))
    return compare_logits(ref(ids).logits[..., : cfg.vocab_size], ours.eval()(ids))


@dataclass(frozen=True)
class VerifyRequest:
    """`mzoo verify`: two checkpoints (any format, any layout) run on the same random tokens."""

    a: Path
    b: Path
    batch: int = 2
    seq_len: int = 32
    seed: int = 0
    tolerance: float = VERIFY_TOLERANCE
    trust_pickle: bool = False
    vocab_size: Optional[int] = None


def verify(req: VerifyRequest) -> Comparison:
    return verify_sources(open_source(req.a, req.trust_pickle, req.vocab_size),
                          open_source(req.b, req.trust_pickle, req.vocab_size), req.batch, req.seq_len, req.seed,
                          req.tolerance)
