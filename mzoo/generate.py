"""Autoregressive sampling with an inference cache, for any mzoo model.

A model's forward accepts `cache=InferenceCache`: attention layers keep their keys and values
there, Mamba layers their convolution and SSM states, each under its global layer number, and the
model advances `cache.offset` by the tokens it consumed. The prompt runs once (prefill); every
new token then costs one position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from mzoo.config import ModelConfig
from mzoo.errors import UserError
from mzoo.plan.costs import count_params, kv_width, layer_kind_counts


@dataclass
class InferenceCache:
    """Per-layer state of one batch of sequences; `offset` = positions already processed."""

    offset: int = 0
    layers: dict[int, Any] = field(default_factory=dict)

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [s, b, heads, d] after the earlier ones; return all of them."""
        if layer in self.layers:
            old_k, old_v = self.layers[layer]
            k, v = torch.cat([old_k, k]), torch.cat([old_v, v])
        self.layers[layer] = (k, v)
        return k, v

    def attention_mask(self, q_len: int, k_len: int, device=None) -> Optional[torch.Tensor]:
        """Causal mask of new queries against every cached key (None when a plain causal or no mask
        is exact: prefill from empty, or one new token)."""
        if q_len == 1 or q_len == k_len:
            return None
        start = k_len - q_len
        rows = torch.arange(q_len, device=device)[:, None] + start
        return torch.arange(k_len, device=device)[None, :] <= rows


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: Optional[int] = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise UserError(f"--temperature must not be negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}.")


def memory_needed(cfg: ModelConfig, prompt_tokens: int, new_tokens: int, element_bytes: int = 4) -> int:
    """Bytes a generation is sure to allocate: the weights at `element_bytes`, the keys and values of
    every attention layer at the final length (twice: each step's torch.cat copies them) and the
    prompt's logits."""
    tokens = min(prompt_tokens + new_tokens, cfg.max_position_embeddings)
    attention = sum(n for blocks, n in layer_kind_counts(cfg) if {"gqa", "mla"} & set(blocks))
    cache = 2 * attention * kv_width(cfg) * tokens * element_bytes
    logits = prompt_tokens * cfg.padded_vocab_size() * 4
    return count_params(cfg).total * element_bytes + int(cache) + logits


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [b, V] -> token ids [b]: argmax, or nucleus sampling at the temperature."""
    if cfg.temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: torch.Tensor, cfg: GenerationConfig, context: int,
             on_token: Callable[[int], None] = lambda t: None) -> list[int]:
    """New token ids for a prompt [1, s]; `on_token` sees each one as it is made (streaming)."""
    cfg.validate()
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise UserError("the prompt must be a non-empty sequence of token ids.")
    if prompt.shape[1] >= context:
        raise UserError(f"the prompt has {prompt.shape[1]} tokens but the model's context is {context}; "
                        "shorten the prompt.")
    steps = min(cfg.max_new_tokens, context - prompt.shape[1])
    generator = torch.Generator().manual_seed(cfg.seed)
    cache = InferenceCache()
    model.eval()
    logits = model(prompt, cache=cache)[:, -1]
    out: list[int] = []
    for i in range(steps):
        token = next_token(logits, cfg, generator)
        out.append(int(token))
        on_token(out[-1])
        if out[-1] == cfg.eos_token_id or i == steps - 1:
            break
        logits = model(token.view(1, 1), cache=cache)[:, -1]
    return out
