"""Megatron-Core's GPTModel in plain torch: the decoder behind GPT-2/3 and LLaMA 2/3.

Read top to bottom: rotary/learned positions -> attention -> MLP -> transformer layer -> block ->
model. Parameter names are Megatron-Core's Transformer-Engine spelling, so a legacy Megatron rank
file loads with `load_state_dict(strict=True)`. Activations are [sequence, batch, hidden].
Families differ only by configuration (norm, activation, positions, biases, GQA, tying).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from mzoo.config import ModelConfig
from mzoo.models.rope import RotaryEmbedding, apply_rotary
from mzoo.parallel import collectives as C
from mzoo.parallel.context import ContextParallelAttention, chunk_indices
from mzoo.parallel.cross_entropy import vocab_parallel_cross_entropy
from mzoo.parallel.layers import (
    ColumnParallelLinear,
    LayerNormColumnParallelLinear,
    Norm,
    RowParallelLinear,
    VocabParallelEmbedding,
    gated,
    mark_sequence_parallel,
    mark_tensor_parallel_partial,
)
from mzoo.parallel.random import RNGTracker, checkpoint_with_rng
from mzoo.parallel.sharding import expert_index, get_spec, renumber_expert, to_local
from mzoo.parallel.state import ParallelState

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "squared_relu": lambda x: F.relu(x).square(),
    "silu": F.silu,
    "swiglu": F.silu,  # gated: act(gate) * up
    "geglu": F.gelu,
    "quick_geglu": lambda x: x * torch.sigmoid(1.702 * x),  # gated (GPT-OSS; Megatron's quick_gelu)
}


Mask = Union[torch.Tensor, ContextParallelAttention]  # [b, 1, s, s] bool, or this CP rank's chunks


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, state: ParallelState,
                   cache=None, scale: Optional[float] = None, enable_gqa: bool = False,
                   mask: Optional[Mask] = None) -> torch.Tensor:
    """Causal SDPA on [b, h, s, d]; with an inference cache, new queries see every cached key;
    `mask` [b, 1, s, s] (packed sequences) replaces the plain causal mask. Under context parallelism
    `mask` says which chunks this rank holds, and the keys of every CP rank are attended to."""
    if isinstance(mask, ContextParallelAttention):
        return mask(q, k, v, scale)  # Layout.validate_for refuses attention dropout with CP
    if mask is None and cache is not None:
        mask = cache.attention_mask(q.shape[2], k.shape[2], q.device)
    causal = mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
    if not dropout:  # no random numbers drawn: no RNG state to switch (a host round trip per call on GPUs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return _attention_with_dropout(q, k, v, mask, dropout, causal, scale, enable_gqa, state)


@torch._disable_dynamo  # torch.compiler.disable, importing the compiler stack (~1-2 s) only when first called
def _attention_with_dropout(q, k, v, mask, dropout: float, causal: bool, scale, enable_gqa: bool,
                            state: ParallelState) -> torch.Tensor:
    """SDPA with dropout in this rank's stream. Eager even inside a compiled layer (`--compile`: a
    graph break here): the tracker swaps the generator's state in Python, which a graph cannot
    capture, and inductor's own random numbers would draw other masks than eager."""
    with state.rng.fork():  # this rank's heads: its own dropout stream
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                              scale=scale, enable_gqa=enable_gqa)


class SelfAttention(nn.Module):
    """Grouped-query attention with a fused QKV laid out per query group: [q heads; k; v]."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype=None, layer: int = 0):
        super().__init__()
        tp = state.tp
        self.heads, self.groups, self.dim = cfg.num_attention_heads // tp, cfg.groups // tp, cfg.kv_channels
        rows = (cfg.num_attention_heads + 2 * cfg.groups) * self.dim
        self.linear_qkv = LayerNormColumnParallelLinear(
            cfg.hidden_size, rows, state, cfg.normalization, cfg.norm_eps,
            bias=cfg.add_qkv_bias or cfg.add_bias_linear, dtype=dtype,
        )
        if cfg.qk_layernorm:
            self.q_layernorm = Norm(self.dim, cfg.normalization, cfg.norm_eps, dtype)
            self.k_layernorm = Norm(self.dim, cfg.normalization, cfg.norm_eps, dtype)
            for norm in (self.q_layernorm, self.k_layernorm):  # each TP rank's grads: its own heads
                mark_tensor_parallel_partial(norm.weight, getattr(norm, "bias", None))
        else:
            self.q_layernorm = self.k_layernorm = None
        self.linear_proj = RowParallelLinear(
            cfg.num_attention_heads * self.dim, cfg.hidden_size, state, bias=cfg.add_bias_linear, dtype=dtype
        )
        self.core_attention = None  # sinks and / or a sliding window (GPT-OSS): models/attention.py
        if cfg.softmax_type != "vanilla" or cfg.window_size is not None:
            from mzoo.models.attention import CoreAttention

            self.core_attention = CoreAttention(cfg, state, layer, dtype)
        self.recompute = False  # selective recomputation of the core attention
        self.state, self.dropout = state, cfg.attention_dropout
        self.layer_number = layer  # global index: keys of the inference cache

    def _core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache=None,
                        mask: Optional[Mask] = None) -> torch.Tensor:
        if self.core_attention is not None:  # sinks / window: eager, or tiled under CP
            return self.core_attention(q, k, v, mask, self.dropout if self.training else 0.0, self.state)
        return core_attention(q, k, v, self.dropout if self.training else 0.0, self.state, cache,
                              enable_gqa=self.groups != self.heads, mask=mask)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]], cache=None,
                mask: Optional[Mask] = None) -> torch.Tensor:
        qkv = self.linear_qkv(x)
        s, b = qkv.shape[:2]
        per_group = self.heads // self.groups
        qkv = qkv.view(s, b, self.groups, per_group + 2, self.dim)
        q = qkv[:, :, :, :per_group].reshape(s, b, self.heads, self.dim)
        k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append_kv(self.layer_number, k, v)
        # [s, b, h, d] -> [b, h, s, d] for SDPA; GQA handled by enable_gqa.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if self.recompute and self.training and torch.is_grad_enabled():  # selective: keep no [s, s] scores
            out = checkpoint_with_rng(self._core_attention, q, k, v, None, mask, tracker=self.state.rng)
        else:
            out = self._core_attention(q, k, v, cache, mask)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.dim)
        return self.linear_proj(out)


class MLP(nn.Module):
    """fc1 -> activation -> fc2; gated fc1 holds [gate; up], split per section over TP. The
    pre-MLP norm is fused into fc1 (TE spelling) except for shared experts, which follow the
    MoE layer's own `pre_mlp_layernorm`."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ffn: int, dtype=None, fused_norm: bool = True):
        super().__init__()
        self.gated, self.act, self.glu = cfg.gated, ACTIVATIONS[cfg.activation], glu_options(cfg)
        width = ffn * (2 if self.gated else 1)
        kw = dict(bias=cfg.add_bias_linear, sections=(ffn, ffn) if self.gated else None, dtype=dtype)
        if fused_norm:
            self.linear_fc1 = LayerNormColumnParallelLinear(
                cfg.hidden_size, width, state, cfg.normalization, cfg.norm_eps, **kw)
        else:
            self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, width, state, **kw)
        self.linear_fc2 = RowParallelLinear(ffn, cfg.hidden_size, state, bias=cfg.add_bias_linear, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            h = gated(h, self.act, *self.glu)
        else:
            h = self.act(h)
        return self.linear_fc2(h)


def glu_options(cfg: ModelConfig) -> tuple[Optional[float], float]:
    """(clamp, linear offset) of the gated activation: (None, 0.0) is plain act(gate) * up."""
    return cfg.activation_func_clamp_value, cfg.glu_linear_offset


class TransformerLayer(nn.Module):
    """Pre-norm residual layer. Norms live inside the fused linears (TE spelling), except where
    Megatron keeps them separate: `input_layernorm` before multi-latent attention and
    `pre_mlp_layernorm` before a mixture of experts."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, number: int, dtype=None):
        super().__init__()
        self.input_layernorm = self.pre_mlp_layernorm = None
        if cfg.mla is not None:
            from mzoo.models.mla import MLASelfAttention

            self.input_layernorm = _separate_norm(cfg, dtype)
            self.self_attention = MLASelfAttention(cfg, state, dtype)
        else:
            self.self_attention = SelfAttention(cfg, state, dtype, number)
        if cfg.is_moe_layer(number):
            from mzoo.models.moe import MoELayer

            self.pre_mlp_layernorm = _separate_norm(cfg, dtype)
            self.mlp = MoELayer(cfg, state, dtype)
        else:
            self.mlp = MLP(cfg, state, cfg.ffn_hidden_size, dtype)
        self.self_attention.layer_number = number
        self.state, self.p = state, cfg.hidden_dropout
        self.mlp_kind = "moe" if cfg.is_moe_layer(number) else "mlp"
        self.recompute_mlp = False  # selective recomputation of the whole MLP / MoE block

    def forward(self, x: torch.Tensor, rope, cache=None, mask: Optional[Mask] = None) -> torch.Tensor:
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        x = x + hidden_dropout(self.self_attention(h, rope, cache, mask), self.p, self.training, self.state)
        h = x if self.pre_mlp_layernorm is None else self.pre_mlp_layernorm(x)
        out = maybe_recomputed(self.mlp, h, self.recompute_mlp, self.state)
        return x + hidden_dropout(out, self.p, self.training, self.state)


RECOMPUTE_MODULES = ("core_attn", "mlp", "moe")  # what --recompute selective can recompute (Megatron's names)


def maybe_recomputed(module: nn.Module, x: torch.Tensor, recompute: bool, state: ParallelState) -> torch.Tensor:
    """module(x), keeping only x for backward when `recompute` (the module runs again in backward)."""
    if recompute and module.training and torch.is_grad_enabled():
        return checkpoint_with_rng(module, x, tracker=state.rng)
    return module(x)


def _separate_norm(cfg: ModelConfig, dtype) -> Norm:
    norm = Norm(cfg.hidden_size, cfg.normalization, cfg.norm_eps, dtype)
    mark_sequence_parallel(norm.weight, norm.bias)
    return norm


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool: causal and within the same segment."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments[:, :, None] == segments[:, None, :])).unsqueeze(1)


def hidden_dropout(x: torch.Tensor, p: float, training: bool, state: ParallelState) -> torch.Tensor:
    """Dropout on the residual stream: the same mask on every TP rank (default stream), unless the
    stream is split along the sequence (SP), where each rank draws its own (model-parallel stream)."""
    if not p or not training:
        return x
    return _eager_dropout(x, p, state.rng if state.config.sequence_parallel else None)


@torch._disable_dynamo  # see _attention_with_dropout
def _eager_dropout(x: torch.Tensor, p: float, tracker: Optional[RNGTracker]) -> torch.Tensor:
    """F.dropout from the default stream, or inside `tracker.fork()`. Eager even inside a compiled
    layer (a graph break), for the reason `_attention_with_dropout` gives: the same masks as eager."""
    if tracker is None:
        return F.dropout(x, p, True)
    with tracker.fork():
        return F.dropout(x, p, True)


class TransformerBlock(nn.Module):
    """The layers of this pipeline stage (local numbering, like Megatron) and the final norm."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, layers: range, post_process: bool, dtype=None):
        super().__init__()
        self.layer_offset = layers.start
        self.layers = nn.ModuleList(TransformerLayer(cfg, state, n, dtype) for n in layers)
        self.recompute_layers = 0  # full recomputation of the first N layers: keep only their inputs
        self.final_layernorm = Norm(cfg.hidden_size, cfg.normalization, cfg.norm_eps, dtype) if post_process else None
        if self.final_layernorm is not None:
            mark_sequence_parallel(self.final_layernorm.weight, self.final_layernorm.bias)

    def forward(self, x: torch.Tensor, rope, cache=None, mask: Optional[Mask] = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i < self.recompute_layers and self.training and torch.is_grad_enabled():
                x = checkpoint_with_rng(layer, x, rope, None, mask, tracker=layer.state.rng)
            else:
                x = layer(x, rope, cache, mask)
        return self.final_layernorm(x) if self.final_layernorm is not None else x


class Embedding(nn.Module):
    """Word embeddings (vocab-parallel) plus learned positions for GPT-2-style models."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, padded_vocab: int, dtype=None):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, state, dtype)
        self.position_embeddings = None
        if cfg.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(positions)
        return x.transpose(0, 1).contiguous()  # [s, b, h]


class GPTModel(nn.Module):
    """One pipeline stage of a decoder-only transformer (the whole model when pp = 1).

    forward(input_ids [b, s]) returns logits [b, s, vocab_size] on the true vocabulary (padding
    rows dropped, gathered over TP) on the last stage, or hidden states [s, b, h] before it; with
    `labels` [b, s] the last stage returns the per-token loss [b, s] (vocab-parallel CE).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        state: Optional[ParallelState] = None,
        layers: Optional[range] = None,
        dtype: Optional[torch.dtype] = None,
        pre_process: Optional[bool] = None,
        post_process: Optional[bool] = None,
    ):
        super().__init__()
        state = state or ParallelState.single()
        self.cfg, self.state = cfg, state
        self.layers_range = layers if layers is not None else range(cfg.num_layers)
        self.pre_process = state.is_first_stage if pre_process is None else pre_process
        self.post_process = state.is_last_stage if post_process is None else post_process
        self.padded_vocab = cfg.padded_vocab_size(state.tp)
        self.embedding = Embedding(cfg, state, self.padded_vocab, dtype) if self.pre_process else None
        rotary_dim = cfg.mla.qk_rope_head_dim if cfg.mla is not None else cfg.kv_channels
        self.rotary = RotaryEmbedding(cfg, rotary_dim) if cfg.position_embedding == "rope" else None
        self.decoder = self.build_decoder(cfg, state, dtype)
        self.output_layer = None
        if self.post_process and not (cfg.tie_embeddings and self.pre_process):
            self.output_layer = ColumnParallelLinear(
                cfg.hidden_size, self.padded_vocab, state, bias=False, vocab=True, dtype=dtype
            )
            if cfg.tie_embeddings:  # pipeline: the last stage's copy of the first stage's embedding
                self.output_layer.weight.shared_embedding = True  # grads summed over the embedding group
                self.output_layer.weight.embedding_copy = True  # counted once (on the first stage) in norms
        if cfg.tie_embeddings and self.pre_process and not self.post_process:
            self.embedding.word_embeddings.weight.shared_embedding = True

    def build_decoder(self, cfg: ModelConfig, state: ParallelState, dtype) -> nn.Module:
        """This stage's layers and final norm (subclasses stack other layer kinds)."""
        return TransformerBlock(cfg, state, self.layers_range, self.post_process, dtype)

    def output_weight(self) -> torch.Tensor:
        return self.output_layer.weight if self.output_layer is not None else self.embedding.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        hidden: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache=None,
        segments: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`cache` (mzoo.generate.InferenceCache): decode after the cached positions. `segments`
        [b, s]: packed examples; a token attends only to earlier tokens of its own segment. Under
        context parallelism every [b, s] input is this rank's two chunks (mzoo.parallel.context)."""
        b, s = self._batch_shape(input_ids, hidden)
        device = input_ids.device if input_ids is not None else hidden.device
        cp = self.state.config.cp
        if position_ids is None and cp > 1:  # this rank's two chunks: their global positions
            position_ids = chunk_indices(s * cp, cp, self.state.cp_rank, device).expand(b, s)
        elif position_ids is None:
            start = cache.offset if cache is not None else 0
            position_ids = torch.arange(start, start + s, device=device).expand(b, s)
        x = self.embedding(input_ids, position_ids) if self.pre_process else hidden
        if self.state.config.sequence_parallel and self.pre_process:
            x = C.scatter_to_sp(x, self.state.tp_group)
        if self.pre_process:
            x = hidden_dropout(x, self.cfg.hidden_dropout, self.training, self.state)
        rope = self.rotary(position_ids) if self.rotary is not None else None
        if cp > 1:
            mask = ContextParallelAttention.build(self.state, s, device, segments)
        else:
            mask = segment_mask(segments) if segments is not None else None
        x = self.decoder(x, rope, cache, mask)
        if cache is not None and self.post_process:
            cache.offset += s
        if not self.post_process:
            return x
        # Under SP the all-gather's backward (reduce-scatter) replaces copy_to_tp's all-reduce.
        if self.state.config.sequence_parallel:
            x = C.gather_from_sp(x, self.state.tp_group)
        else:
            x = C.copy_to_tp(x, self.state.tp_group)
        logits = F.linear(x, self.output_weight())  # [s, b, V_padded / tp]
        if labels is not None:  # per-token loss [b, s] without gathering the vocabulary
            start = self.state.tp_rank * logits.shape[-1]
            loss = vocab_parallel_cross_entropy(logits, labels.t(), start, self.cfg.vocab_size, self.state.tp_group)
            return loss.t()
        logits = C.gather_from_tp(logits, self.state.tp_group)
        return logits.transpose(0, 1)[..., : self.cfg.vocab_size]

    def _batch_shape(self, input_ids: Optional[torch.Tensor], hidden: Optional[torch.Tensor]) -> tuple[int, int]:
        """(batch, sequence): from the token ids, or on later pipeline stages (which read no data)
        from the received hidden states [s, b, h] (sequence-sharded under SP)."""
        if input_ids is not None:
            return tuple(input_ids.shape)
        sp = self.state.tp if self.state.config.sequence_parallel else 1
        return hidden.shape[1], hidden.shape[0] * sp

    def set_recompute(self, mode: str, modules: tuple[str, ...] = (), num_layers: Optional[int] = None) -> None:
        """Activation recomputation as Megatron's flags: 'none'; 'selective' with `modules` from
        RECOMPUTE_MODULES (default core attention); 'full' on the first `num_layers` layers of this
        chunk (all by default; Megatron's block method)."""
        if mode not in ("none", "selective", "full"):
            raise ValueError(f"unknown recompute mode '{mode}'; use none, selective or full.")
        unknown = sorted(set(modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ValueError(f"unknown recompute module {', '.join(unknown)}; use {', '.join(RECOMPUTE_MODULES)}.")
        chosen = set(modules or ("core_attn",)) if mode == "selective" else set()
        layers = self.decoder.layers
        self.decoder.recompute_layers = (len(layers) if num_layers is None else num_layers) if mode == "full" else 0
        for layer in layers:
            attention = getattr(layer, "self_attention", None)
            if attention is not None and hasattr(attention, "recompute"):
                attention.recompute = "core_attn" in chosen
            if hasattr(layer, "recompute_mlp"):
                layer.recompute_mlp = layer.mlp_kind in chosen

    def compile_layers(self) -> None:
        """torch.compile each decoder layer in place (regional compilation, as torchtitan applies it):
        compile time is one layer's, since identical layers share the compiled code, and parameter
        names stay canonical (`Module.compile` wraps the call, not the module). Shapes are static
        (a run's micro-batches all have one shape). Recomputation wraps a compiled layer from outside
        (full) or is traced inside it (selective); dropout runs eagerly between graphs (see
        `_eager_dropout`), so masks and the TP-aware RNG streams are eager's."""
        for layer in self.decoder.layers:
            layer.compile(dynamic=False)

    # ---- naming and initialisation ------------------------------------------------------------
    def canonical_name(self, local_name: str) -> str:
        """State-dict name -> canonical name (global layer and expert indices; a tied output copy
        is the embedding)."""
        prefix = "decoder.layers."
        expert = expert_index(local_name)
        if expert is not None and self.state.config.ep > 1:
            local_name = renumber_expert(local_name, self.state.ep_rank * self.cfg.moe.num_experts // self.state.config.ep
                                         + expert)
        if local_name.startswith(prefix) and self.decoder.layer_offset:
            index, rest = local_name[len(prefix) :].split(".", 1)
            return f"{prefix}{int(index) + self.decoder.layer_offset}.{rest}"
        if local_name == "output_layer.weight" and self.cfg.tie_embeddings:
            return "embedding.word_embeddings.weight"
        return local_name

    def canonical_parameters(self):
        """(canonical name, parameter) for every parameter of this chunk."""
        for name, p in self.named_parameters():
            yield self.canonical_name(name), p

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Megatron's init on the global (unpadded) tensors, then this rank's shard: the same seed
        gives the same model in every layout."""
        for name, p in self.canonical_parameters():
            shape = _global_shape(p, self.state, self.cfg.vocab_size)
            with torch.device("cpu"):  # CPU generators: the same values whatever device the model is on
                value = to_local(p, init_tensor(self.cfg, name, shape, seed), self.state.tp, self.state.tp_rank)
            p.copy_(value.to(p.dtype))


def _global_shape(p: torch.Tensor, state: ParallelState, vocab_size: int) -> tuple[int, ...]:
    spec = get_spec(p)
    shape = list(p.shape)
    if spec.axis == "tp":
        shape[spec.dim] *= state.tp
    if spec.vocab:
        shape[spec.dim] = vocab_size
    return tuple(shape)


def init_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial value of a canonical tensor: normal(0, std) for weights (std / sqrt(2L) on the
    output projections, as Megatron scales them), ones for norm weights, zeros for biases."""
    if cfg.ssm is not None and ".mixer." in name:  # A_log, D, dt, conv: Mamba's own init
        from mzoo.models.mamba import init_mamba_tensor

        value = init_mamba_tensor(cfg, name, shape, seed)
        if value is not None:
            return value
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("bias", "layer_norm_bias", "expert_bias"):
        return torch.zeros(shape)
    if leaf == "layer_norm_weight" or (leaf == "weight" and "norm" in name.rsplit(".", 2)[-2]):
        return torch.ones(shape)
    std = cfg.init_method_std
    if name.endswith(("linear_proj.weight", "linear_fc2.weight", "out_proj.weight")):
        std = std / math.sqrt(2.0 * cfg.num_layers)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


