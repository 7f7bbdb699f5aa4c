"""Megatron-Core's MambaModel in plain torch: pure Mamba models and Mamba/attention hybrids.

The stack holds one layer per symbol of `ssm.hybrid_pattern` (Megatron's hybrid_override_pattern);
a config without a pattern is all Mamba layers. Each layer is pre-norm residual with its norm fused
into its first linear (the Transformer-Engine spelling), except MoE layers, which keep a separate
`pre_mlp_layernorm` as Megatron does:

    M  Mamba mixer (models/mamba.py)         mixer.in_proj.layer_norm_weight, mixer.in_proj.weight, mixer.*
    *  self-attention (models/gpt.py)        self_attention.linear_qkv.layer_norm_weight, .linear_qkv.weight,
                                             self_attention.linear_proj.weight
    -  MLP (models/gpt.py)                   mlp.linear_fc1.layer_norm_weight, mlp.linear_fc1.weight,
                                             mlp.linear_fc2.weight
    E  mixture of experts (models/moe.py)    pre_mlp_layernorm.weight, mlp.router.weight, mlp.experts.*

(names under `decoder.layers.N.`; docs/mamba.md lists every tensor).

Embedding and output layer are GPTModel's; the final norm is `decoder.final_norm` (Megatron's
MambaStack name). Pipeline stages, the forward signature, naming and EP renumbering are GPTModel's.
"""

from __future__ import annotations


import torch
from torch import nn

from mzoo.config import ModelConfig
from mzoo.errors import UserError
from mzoo.models.gpt import (
    MLP, GPTModel, SelfAttention, _separate_norm, hidden_dropout, maybe_recomputed,
)
from mzoo.models.mamba import build_mixer
from mzoo.parallel.layers import Norm, mark_sequence_parallel
from mzoo.parallel.random import checkpoint_with_rng
from mzoo.parallel.state import ParallelState


class MambaLayer(nn.Module):
    """M: x + mixer(x); the mixer's in_proj carries the layer's norm."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, number: int, dtype=None):
        super().__init__()
        self.mixer = build_mixer(cfg, state, dtype)
        self.mixer.layer_number = number
        self.state, self.p = state, cfg.hidden_dropout

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask=None) -> torch.Tensor:
        if mask is not None:
            raise UserError("Mamba layers cannot yet keep packed sequences (segments) apart; train without "
                            "sequence packing.")
        return x + hidden_dropout(self.mixer(x, cache), self.p, self.training, self.state)


class AttentionLayer(nn.Module):
    """*: x + self_attention(x); Megatron's TransformerLayer with only its attention half."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, number: int, dtype=None):
        super().__init__()
        self.self_attention = SelfAttention(cfg, state, dtype, number)
        self.state, self.p = state, cfg.hidden_dropout

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask=None) -> torch.Tensor:
        out = self.self_attention(x, rope, cache, mask)
        return x + hidden_dropout(out, self.p, self.training, self.state)


class MLPLayer(nn.Module):
    """-: x + mlp(x) (Megatron's MLPLayer)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, number: int, dtype=None):
        super().__init__()
        self.mlp = MLP(cfg, state, cfg.ffn_hidden_size, dtype)
        self.state, self.p = state, cfg.hidden_dropout
        self.mlp_kind, self.recompute_mlp = "mlp", False

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask=None) -> torch.Tensor:
        out = maybe_recomputed(self.mlp, x, self.recompute_mlp, self.state)
        return x + hidden_dropout(out, self.p, self.training, self.state)


class ExpertsLayer(nn.Module):
    """E: x + mlp(pre_mlp_layernorm(x)), mlp the routed experts (Megatron's MoETransformerLayer)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, number: int, dtype=None):
        super().__init__()
        from mzoo.models.moe import MoELayer

        self.pre_mlp_layernorm = _separate_norm(cfg, dtype)
        self.mlp = MoELayer(cfg, state, dtype)
        self.state, self.p = state, cfg.hidden_dropout
        self.mlp_kind, self.recompute_mlp = "moe", False

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask=None) -> torch.Tensor:
        out = maybe_recomputed(self.mlp, self.pre_mlp_layernorm(x), self.recompute_mlp, self.state)
        return x + hidden_dropout(out, self.p, self.training, self.state)


LAYERS = {"mamba": MambaLayer, "attention": AttentionLayer, "mlp": MLPLayer, "moe": ExpertsLayer}


class MambaStack(nn.Module):
    """The layers of this pipeline stage (local numbering, like Megatron) and the final norm."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, layers: range, post_process: bool, dtype=None):
        super().__init__()
        kinds = cfg.layer_types
        self.layer_offset = layers.start
        self.layers = nn.ModuleList(LAYERS[kinds[n]](cfg, state, n, dtype) for n in layers)
        self.recompute_layers = 0  # full recomputation of the first N layers: keep only their inputs
        self.final_norm = None
        if post_process:
            self.final_norm = Norm(cfg.hidden_size, cfg.normalization, cfg.norm_eps, dtype)
            mark_sequence_parallel(self.final_norm.weight, self.final_norm.bias)

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask=None) -> torch.Tensor:
        """TransformerBlock's signature, so that GPTModel.forward drives this stack too."""
        for i, layer in enumerate(self.layers):
            if i < self.recompute_layers and self.training and torch.is_grad_enabled():
                x = checkpoint_with_rng(layer, x, rope, None, mask, tracker=layer.state.rng)
            else:
                x = layer(x, rope, cache, mask)
        return self.final_norm(x) if self.final_norm is not None else x


class MambaModel(GPTModel):
    """One pipeline stage of a Mamba or hybrid model (the whole model when pp = 1): GPTModel's
    embedding, output layer, forward, naming and initialisation around a MambaStack decoder."""

    def build_decoder(self, cfg: ModelConfig, state: ParallelState, dtype) -> nn.Module:
        return MambaStack(cfg, state, self.layers_range, self.post_process, dtype)
