"""Where LoRA adapters go in mzoo's decoder and how their outputs join the fused linears.

The engine's adapters (mzoo/parallel/lora.py) know nothing of attention: this module gives each
target its parts and the function that interleaves the parts' outputs into the base's local output
(q/k/v per query group, as Megatron lays out linear_qkv; [gate; up] for a gated fc1), so that
B_q, B_k, B_v and B_gate, B_up stay in Hugging Face row order and export to peft unchanged.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mzoo.config import ModelConfig
from mzoo.errors import UserError
from mzoo.parallel.lora import ColumnLoRA, LoRAConfig, RowLoRA, freeze, global_shape, init_adapter_tensor, is_adapter
from mzoo.parallel.sharding import to_local

LORA_FAMILIES = ("llama", "mixtral", "qwen2", "qwen3", "qwen3_moe")  # separate q/k/v and gate/up projections in HF


def check_lora(cfg: ModelConfig, lora: LoRAConfig) -> None:
    """Refuse, in one sentence, a model or target the adapters cannot cover."""
    lora.validate()
    name = cfg.name or cfg.family
    if cfg.family not in LORA_FAMILIES or cfg.mla is not None or cfg.ssm is not None:
        raise UserError(f"{name}: LoRA supports {', '.join(LORA_FAMILIES)} models (separate q/k/v projections in "
                        "Hugging Face); finetune this one without --lora-rank.")
    mlp_parts = {"gate", "up", "fc1", "fc2"} & set(lora.parts)
    if cfg.moe is not None and mlp_parts and all(cfg.is_moe_layer(n) for n in range(cfg.num_layers)):
        raise UserError(f"{name}: every layer's MLP is a mixture of experts, and LoRA on experts is not supported "
                        "yet; use --lora-targets qkv,proj.")


def _qkv_combine(groups: int, per: int, dim: int):
    def combine(outs: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        s, b = like.shape[:2]
        pieces = []
        for role, heads in (("q", per), ("k", 1), ("v", 1)):
            out = outs.get(role)
            pieces.append(like.new_zeros(s, b, groups, heads * dim) if out is None else out.view(s, b, groups, heads * dim))
        return torch.cat(pieces, dim=-1).reshape(s, b, -1)

    return combine


def _concat(roles: tuple[str, ...], rows: int):
    def combine(outs: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        s, b = like.shape[:2]
        return torch.cat([outs[r] if r in outs else like.new_zeros(s, b, rows) for r in roles], dim=-1)

    return combine


def _layers(model: nn.Module) -> Iterator[nn.Module]:
    chunks = model if isinstance(model, nn.ModuleList) else [model]
    for chunk in chunks:
        yield from chunk.decoder.layers


def add_lora(model: nn.Module, cfg: ModelConfig, lora: LoRAConfig, seed: int = 0, b_std: float = 0.0) -> None:
    """Freeze this rank's model (chunks) and attach the adapters `lora.parts` name, initialised on
    the global tensors (the same adapter in every layout)."""
    check_lora(cfg, lora)
    freeze(model)
    state = model.state
    tp, d, parts = state.tp, cfg.kv_channels, set(lora.parts)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.device(device):
        for layer in _layers(model):
            attn = layer.self_attention
            qkv = {r: n for r, n in (("q", cfg.num_attention_heads * d), ("k", cfg.groups * d),
                                     ("v", cfg.groups * d)) if r in parts}
            if qkv:
                attn.linear_qkv.lora = ColumnLoRA(cfg.hidden_size, qkv, lora, state,
                                                  _qkv_combine(cfg.groups // tp, cfg.num_attention_heads // cfg.groups, d),
                                                  dtype)
            if "proj" in parts:
                attn.linear_proj.lora = RowLoRA(cfg.num_attention_heads * d, cfg.hidden_size, "proj", lora, state, dtype)
            if layer.mlp_kind != "mlp":
                continue  # experts: not yet (check_lora refuses a model with no dense MLP)
            ffn, mlp = cfg.ffn_hidden_size, layer.mlp
            roles = ("gate", "up") if cfg.gated else ("fc1",)
            fc1 = {r: ffn for r in roles if r in parts}
            if fc1:
                mlp.linear_fc1.lora = ColumnLoRA(cfg.hidden_size, fc1, lora, state, _concat(roles, ffn // tp), dtype)
            if "fc2" in parts:
                mlp.linear_fc2.lora = RowLoRA(ffn, cfg.hidden_size, "fc2", lora, state, dtype)
    init_adapters(model, seed, b_std)


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of this rank's adapter tensors."""
    for name, p in model.canonical_parameters():
        if is_adapter(p):
            yield name, p


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int = 0, b_std: float = 0.0) -> None:
    state = model.state
    for name, p in adapter_parameters(model):
        with torch.device("cpu"):
            value = init_adapter_tensor(name, global_shape(p, state.tp), seed, b_std)
        p.copy_(to_local(p, value, state.tp, state.tp_rank).to(p.dtype))


@torch.no_grad()
def load_adapters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Fill this rank's adapters from canonical adapter tensors (a peft adapter read by
    converters/peft.py, which checks that it holds nothing else); every adapter this rank has must be there."""
    state = model.state
    names = dict(adapter_parameters(model))
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise UserError(f"the adapter lacks {missing[0]}; give --lora-targets matching its target_modules.")
    for name, p in names.items():
        p.copy_(to_local(p, tensors[name], state.tp, state.tp_rank).to(p.dtype))
