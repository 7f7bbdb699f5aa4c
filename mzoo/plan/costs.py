"""The one cost model of a network: per-block parameters, saved activations and FLOPs, exactly as mzoo's
models shard them; per-rank and global parameter counts are sums of the same block formulas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mzoo.config import HYBRID_SYMBOLS, ModelConfig
from mzoo.layout import Layout
from mzoo.parallel.pipeline import stage_layers
from mzoo.plan.profile import Profile


def _norm(cfg: ModelConfig, size: int) -> int:
    return size * (2 if cfg.normalization == "layernorm" else 1)


@dataclass(frozen=True)
class Shard:
    """How one rank splits a block: TP, expert TP, EP, and whether activations are sequence-parallel."""

    tp: int
    etp: int
    ep: int
    sp: bool


@dataclass(frozen=True)
class BlockParams:
    dense: int = 0  # reduced over DP x CP
    expert: int = 0  # routed experts, reduced over expert-DP
    frozen: int = 0  # no gradient, no optimizer state (DeepSeek-V3's expert_bias, fp32)

    def __add__(self, other: "BlockParams") -> "BlockParams":
        return BlockParams(self.dense + other.dense, self.expert + other.expert, self.frozen + other.frozen)

    def times(self, n: int) -> "BlockParams":
        return BlockParams(self.dense * n, self.expert * n, self.frozen * n)

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.frozen


def layer_kind_counts(cfg: ModelConfig, layers: Optional[range] = None) -> list[tuple[tuple[str, ...], int]]:
    """(blocks of a layer, how many layers of that kind) over `layers` (default: the whole model), in
    the order the kinds first occur, from counts rather than a walk over the layers (a config claiming
    10M layers answers at once)."""
    layers = range(cfg.num_layers) if layers is None else layers
    if not len(layers):
        return []
    if cfg.ssm is not None and cfg.ssm.hybrid_pattern:  # str.count / str.find run in C
        pattern, a, b = cfg.ssm.hybrid_pattern, layers.start, layers.stop
        found = sorted((pattern.find(c, a, b), c) for c in HYBRID_SYMBOLS if pattern.find(c, a, b) >= 0)
        return [(layer_blocks_of(HYBRID_SYMBOLS[c], cfg, False), pattern.count(c, a, b)) for _, c in found]
    if cfg.ssm is not None:
        return [(("mamba",), len(layers))]
    routed = _intersection(cfg.moe_layers, layers)
    kinds = [(layer_blocks_of("transformer", cfg, True), len(routed), routed[0] if routed else -1),
             (layer_blocks_of("transformer", cfg, False), len(layers) - len(routed),
              _first_outside(layers, routed))]
    return [(blocks, n) for blocks, n, _ in sorted(kinds, key=lambda k: k[2]) if n]


def _intersection(every: range | tuple[int, ...], layers: range) -> range | tuple[int, ...]:
    """The indices of the step range `every` (or an explicit list of them) inside the contiguous range `layers`."""
    if not isinstance(every, range):
        return tuple(i for i in every if i in layers)
    if not len(every):
        return every
    start = max(layers.start, every.start)
    first = every.start + -(-(start - every.start) // every.step) * every.step
    return range(first, max(first, min(layers.stop, every.stop)), every.step)


def _first_outside(layers: range, routed: range | tuple[int, ...]) -> int:
    """The first index of `layers` not in `routed` (-1 when every one is)."""
    if not isinstance(routed, range):
        return next((i for i in layers if i not in routed), -1)
    i = layers.start
    if i in routed:  # routed layers are every step-th: the next one is free unless the step is 1
        i = i + 1 if routed.step > 1 else routed.stop
    return i if i < layers.stop else -1


def layer_blocks_of(kind: str, cfg: ModelConfig, moe: bool) -> tuple[str, ...]:
    if kind == "transformer":
        return ("mla" if cfg.mla is not None else "gqa", "moe" if moe else "mlp")
    return {"attention": ("gqa",), "mlp": ("mlp",), "moe": ("moe",), "mamba": ("mamba",)}[kind]


def block_params(cfg: ModelConfig, block: str, s: Shard) -> BlockParams:
    """Parameters one rank holds for one block, exactly as mzoo's models shard them."""
    h, t, bias = cfg.hidden_size, s.tp, cfg.add_bias_linear
    if block == "gqa":
        a, g, d = cfg.num_attention_heads, cfg.groups, cfg.kv_channels
        rows = (a + 2 * g) * d // t
        n = _norm(cfg, h) + rows * h + (rows if cfg.add_qkv_bias or bias else 0)
        n += h * a * d // t + (h if bias else 0) + (2 * _norm(cfg, d) if cfg.qk_layernorm else 0)
        return BlockParams(dense=n + (a // t if cfg.softmax_type == "learnable" else 0))  # sinks: per head
    if block == "mla":
        m, a = cfg.mla, cfg.num_attention_heads
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        n = _norm(cfg, h)
        if m.q_lora_rank:
            n += h * m.q_lora_rank + _norm(cfg, m.q_lora_rank) + m.q_lora_rank * a * qk // t
        else:
            n += h * a * qk // t
        n += h * (m.kv_lora_rank + m.qk_rope_head_dim) + _norm(cfg, m.kv_lora_rank)
        n += m.kv_lora_rank * a * (m.qk_nope_head_dim + m.v_head_dim) // t
        return BlockParams(dense=n + h * a * m.v_head_dim // t + (h if bias else 0))
    if block == "mlp":
        return BlockParams(dense=_norm(cfg, h) + _mlp(cfg, cfg.ffn_hidden_size, t, bias))
    if block == "moe":
        moe = cfg.moe
        shared_ffn = (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size) * moe.num_shared_experts
        dense = _norm(cfg, h) + moe.num_experts * (h + (1 if bias else 0))  # router (+ bias: GPT-OSS)
        dense += _mlp(cfg, shared_ffn, t, bias) if shared_ffn else 0
        expert = moe.num_experts // s.ep * _mlp(cfg, moe.ffn_hidden_size, s.etp, bias)  # biases: GPT-OSS
        return BlockParams(dense=dense, expert=expert, frozen=moe.num_experts if moe.expert_bias else 0)
    if block == "mamba":
        return BlockParams(dense=_mamba(cfg, t))
    raise ValueError(f"unknown block {block}")


def _mlp(cfg: ModelConfig, ffn: int, t: int, bias: bool) -> int:
    """fc1 (column-parallel, gated: [gate; up]) + fc2 (row-parallel, bias replicated)."""
    h, width = cfg.hidden_size, ffn * (2 if cfg.gated else 1)
    return h * width // t + (width // t if bias else 0) + ffn // t * h + (h if bias else 0)


def _mamba(cfg: ModelConfig, t: int) -> int:
    ssm, h, dims = cfg.ssm, cfg.hidden_size, cfg.mamba_dims()
    di, conv = dims["d_inner"] // t, dims["conv_dim"] // t
    rows = dims["in_proj"] // t
    n = _norm(cfg, h) + rows * h + (rows if ssm.proj_bias else 0)
    n += conv * ssm.d_conv + (conv if ssm.conv_bias else 0) + di * h + (h if ssm.proj_bias else 0)
    if ssm.version == 1:
        r = dims["dt_rank"]
        return n + (r + 2 * ssm.d_state) * di + di * r + di + di * ssm.d_state + di
    return n + 3 * dims["nheads"] // t + di


def norm_activations(width: int, sh: float, profile: Profile, sp: bool, feeds_column: bool = True,
                     dropped: bool = False) -> float:
    """Elements (in units of profile.act bytes) a norm and the linear after it keep per token.

    Megatron (TE): the norm's input and its output (the GEMM input; under SP the local shard, the
    all-gather is redone in backward). mzoo's engine: the norm's input (its fp32 rstd per token is
    negligible) and the output, which a column-parallel linear under SP keeps all-gathered (full)."""
    if not profile.engine:  # under --fp8 the output is kept as the GEMM's fp8 input (1 byte)
        return width * sh + (0 if dropped else width * sh * (0.5 if profile.fp8 else 1.0))
    out = width if (sp and feeds_column) else width * sh
    return width * sh + out


def block_activations(cfg: ModelConfig, block: str, s: Shard, profile: Profile, recompute: frozenset) -> float:
    """Bytes one rank saves for backward per token of the micro-batch (T tokens, docs/plan.md), with
    flash attention (no [s, s] scores), tensors split over TP and, under SP, over the sequence."""
    h, t, e, eng = cfg.hidden_size, s.tp, profile.act, profile.engine
    sh = 1.0 / t if s.sp else 1.0  # norms and residuals: sequence-sharded under SP
    layernorm = "layernorm" in recompute  # Megatron's selective recompute of separate norms

    def norm(width: int = h, feeds_column: bool = True, separate: bool = False) -> float:
        return norm_activations(width, sh, profile, s.sp, feeds_column, separate and layernorm)

    lse = 0 if "core_attn" in recompute else 4 * cfg.num_attention_heads / t / e  # softmax statistics, fp32
    if block == "gqa":
        a, g, d = cfg.num_attention_heads, cfg.groups, cfg.kv_channels
        qkv = (a + 2 * g) * d / t  # kept whole: v is a view of the fused QKV output
        rope = (a + g) * d / t  # rotated q and k
        out = a * d / t  # attention output = linear_proj input
        # per-head q/k norms (Qwen3): their fp32 rstd; mzoo's engine also keeps the q its norm reads, a
        # copy out of the grouped QKV (k is a view of it); Megatron's q and k are views (measured: docs/plan.md)
        qk_norm = ((a * d if eng else 0) + 4 / e * (a + g)) / t if cfg.qk_layernorm else 0
        return e * (norm() + qkv + rope + out + lse + qk_norm)
    if block == "mla":
        m, a = cfg.mla, cfg.num_attention_heads
        qk, up = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_nope_head_dim + m.v_head_dim
        n = norm(feeds_column=False, separate=True)  # input_layernorm; the down projections are replicated
        n += norm(m.q_lora_rank) if m.q_lora_rank else 0  # q_up's fused norm on the q latent
        n += norm(m.kv_lora_rank) + m.qk_rope_head_dim * sh  # kv_up's fused norm; the latent keeps k_rot
        if "mla_up_proj" not in recompute:
            n += (2 * qk + up) * a / t  # q, k (concatenated with the rotary parts), kv_up output (v's base)
        return e * (n + m.v_head_dim * a / t + lse)
    if block in ("mlp", "moe") and block in recompute:  # the whole block recomputed: its input only
        return e * h * sh
    if block == "mlp":
        return e * (norm() + _ffn_acts(cfg, cfg.ffn_hidden_size, t, profile))
    if block == "moe":
        moe = cfg.moe
        k, f = moe.top_k, moe.ffn_hidden_size
        rows = k if (s.etp == t) else k * sh  # token copies per token one rank's experts see
        n = norm(feeds_column=False, separate=True) + 4 / e * moe.num_experts * sh  # router scores, fp32
        n += rows * h * (0.5 if profile.fp8 else 1.0) + _ffn_acts(cfg, f, s.etp, profile) * rows  # fc1 in, out, act
        n += rows * h if eng else k * h * sh  # combine: expert outputs kept for the routing-weight product
        shared = (moe.shared_expert_ffn_hidden_size or f) * moe.num_shared_experts
        if shared:
            n += (h if eng and s.sp else 0) + _ffn_acts(cfg, shared, t, profile)  # engine: gathered input
        return e * n
    if block == "mamba":
        dims = cfg.mamba_dims()
        di, rows = dims["d_inner"] / t, dims["in_proj"] / t
        if not eng:  # Megatron: mamba_split_conv1d_scan_combined keeps zxbcdt and its output; out_proj input
            return e * (norm() + rows + 2 * di)
        return e * (norm() + rows + 3 * dims["conv_dim"] / t + 3 * di) + _engine_scan(cfg, t)
    raise ValueError(f"unknown block {block}")


def _ffn_acts(cfg: ModelConfig, ffn: int, t: int, profile: Profile) -> float:
    """fc1 output (gated: [gate; up], kept by the activation, which both frameworks recompute in
    backward) + the activation output (fc2's input, fp8 under --fp8)."""
    fc2_input = ffn * (0.5 if profile.fp8 else 1.0)
    return ((2 if cfg.gated else 1) * ffn + fc2_input) / t


def _engine_scan(cfg: ModelConfig, t: int) -> float:
    """mzoo's pure-torch scans in fp32 (approximate, docs/plan.md): Mamba-2's per-chunk decay and
    scores [heads, chunk] and its B, C repeated per head; Mamba-1's state at every position."""
    ssm, dims = cfg.ssm, cfg.mamba_dims()
    if ssm.version == 1:
        return 4.0 * 3 * dims["d_inner"] / t * ssm.d_state
    return 4.0 * dims["nheads"] / t * (2 * ssm.chunk_size + 2 * ssm.d_state + 2 * ssm.head_dim)


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs per token for the whole (unsharded) block."""

    gemm: float  # linear layers (fp8 under --fp8)
    core: float  # attention scores / SSM scan (bf16)
    recompute_selective: float = 0.0  # linear FLOPs redone by selective recomputation (MLA up-projections)


def block_flops(cfg: ModelConfig, block: str, seq_len: int) -> BlockFlops:
    """2 FLOPs per multiply-add; attention counts Q K^T and A V over the whole sequence (no causal
    halving), as the trainer's MFU counts them (it calls model_flops_per_token)."""
    h = cfg.hidden_size
    if block == "gqa":
        a, g, d = cfg.num_attention_heads, cfg.groups, cfg.kv_channels
        return BlockFlops(2 * h * (a + 2 * g) * d + 2 * a * d * h, 4 * a * d * attended_keys(cfg, seq_len))
    if block == "mla":
        m, a = cfg.mla, cfg.num_attention_heads
        qk, up = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_nope_head_dim + m.v_head_dim
        q = 2 * (h * m.q_lora_rank + m.q_lora_rank * a * qk) if m.q_lora_rank else 2 * h * a * qk
        kv = 2 * h * (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * m.kv_lora_rank * a * up
        ups = 2 * a * qk * (m.q_lora_rank or 0) + 2 * m.kv_lora_rank * a * up
        return BlockFlops(q + kv + 2 * a * m.v_head_dim * h, 2 * a * (qk + m.v_head_dim) * seq_len, ups)
    if block == "mlp":
        return BlockFlops(_mlp_flops(cfg, cfg.ffn_hidden_size), 0.0)
    if block == "moe":
        moe = cfg.moe
        shared = (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size) * moe.num_shared_experts
        gemm = 2 * h * moe.num_experts + moe.top_k * _mlp_flops(cfg, moe.ffn_hidden_size)
        return BlockFlops(gemm + (_mlp_flops(cfg, shared) if shared else 0), 0.0)
    if block == "mamba":
        ssm, dims = cfg.ssm, cfg.mamba_dims()
        di = dims["d_inner"]
        if ssm.version == 1:
            r = dims["dt_rank"]
            gemm = 2 * h * 2 * di + 2 * di * (r + 2 * ssm.d_state) + 2 * r * di + 2 * di * h
            return BlockFlops(gemm, 2 * dims["conv_dim"] * ssm.d_conv + 9 * di * ssm.d_state)
        scan = 2 * dims["nheads"] * ssm.chunk_size * (ssm.d_state + ssm.head_dim) + 4 * di * ssm.d_state
        return BlockFlops(2 * h * dims["in_proj"] + 2 * di * h, 2 * dims["conv_dim"] * ssm.d_conv + scan)
    raise ValueError(f"unknown block {block}")


def attended_keys(cfg: ModelConfig, seq_len: int) -> float:
    """Keys a query's scores span, averaged over the attention layers: the sequence, or at most the
    window on sliding-window layers (GPT-OSS alternates them). An average, so the whole model's count
    is exact and a pipeline stage's is its share of it."""
    if cfg.window_size is None:
        return float(seq_len)
    freq, n = cfg.window_attn_skip_freq, cfg.num_layers
    windowed = n if freq is None else n - n // freq  # counted, not walked (is_window_layer per layer)
    return (windowed * min(seq_len, cfg.window_size) + (cfg.num_layers - windowed) * seq_len) / cfg.num_layers


def _mlp_flops(cfg: ModelConfig, ffn: int) -> float:
    return 2 * cfg.hidden_size * ffn * (3 if cfg.gated else 2)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (3 x forward: backward is twice the forward), without recomputation,
    exact per block (MLA and SSM included): the planner's MFU and the trainer's are this one count."""
    fwd = 2.0 * cfg.hidden_size * cfg.vocab_size  # output layer (tied or not, the logits are a GEMM)
    for blocks, n in layer_kind_counts(cfg):
        for block in blocks:
            f = block_flops(cfg, block, seq_len)
            fwd += n * (f.gemm + f.core)
    return 3.0 * fwd


# ---- one model's costs, cached per block kind -------------------------------------------------------
class Model:
    """A ModelConfig with a memo of per-block results, so that ranking thousands of layouts stays fast
    (every layer of one kind costs the same, and layers are counted per kind, never walked)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._memo: dict = {}

    def _cached(self, key: tuple, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def kinds(self, ranges: tuple[range, ...]) -> list[tuple[tuple[str, ...], int]]:
        """(blocks of a layer, how many layers of that kind) over some layer ranges, in the order the
        kinds first occur."""
        def count():
            out: dict[tuple[str, ...], int] = {}
            for r in ranges:
                for blocks, n in layer_kind_counts(self.cfg, r):
                    out[blocks] = out.get(blocks, 0) + n
            return list(out.items())
        return self._cached(("kinds", ranges), count)

    def params(self, ranges: tuple[range, ...], s: Shard) -> BlockParams:
        def total():
            out = BlockParams()
            for blocks, n in self.kinds(ranges):
                for b in blocks:
                    out += block_params(self.cfg, b, s).times(n)
            return out
        return self._cached(("params", ranges, s), total)

    def layer_activations(self, blocks: tuple[str, ...], s: Shard, profile: Profile, modules: frozenset) -> float:
        return self._cached(("acts", blocks, s, profile, modules),
                            lambda: sum(block_activations(self.cfg, b, s, profile, modules) for b in blocks))

    def flops(self, block: str, seq_len: int) -> BlockFlops:
        return self._cached(("flops", block, seq_len), lambda: block_flops(self.cfg, block, seq_len))

    def model_flops(self, seq_len: int) -> float:
        return self._cached(("model_flops", seq_len), lambda: model_flops_per_token(self.cfg, seq_len))


def as_model(cfg) -> Model:
    """A ModelConfig wrapped for cached costs (a Model passes through)."""
    return cfg if isinstance(cfg, Model) else Model(cfg)


# ---- one rank's parameters ------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """What one pipeline rank holds: its layers (one range of global indices per virtual chunk) and
    the embedding / head."""

    rank: int
    ranges: tuple[range, ...]
    chunks: int
    embedding: bool  # the first chunk of the first stage
    head: bool  # the last chunk of the last stage: final norm, output layer, loss
    output_layer: bool  # false when the head reuses the tied embedding of the same chunk

    @property
    def num_layers(self) -> int:
        return sum(len(r) for r in self.ranges)

    @property
    def layers(self) -> tuple[int, ...]:
        """Every global layer index (for reports; the costs count `ranges` per kind instead)."""
        return tuple(i for r in self.ranges for i in r)


def stages(cfg: ModelConfig, layout: Layout) -> list[Stage]:
    ranges = stage_layers(cfg.num_layers, layout.pp, layout.vpp, layout.first_stage_layers, layout.last_stage_layers)
    out = []
    for p, chunks in enumerate(ranges):
        first, last = p == 0, p == layout.pp - 1
        same_chunk = first and last and len(chunks) == 1
        out.append(Stage(p, tuple(chunks), len(chunks), first, last, last and not (cfg.tie_embeddings and same_chunk)))
    return out


def rank_params(cfg: ModelConfig, layout: Layout, pp_rank: int, vocab_divisible: Optional[int] = None) -> BlockParams:
    """Exact parameter count of one rank of pipeline stage `pp_rank` (every TP / EP rank of a stage
    holds the same number): sharded tensors / tp, experts / ep, norms, routers and MLA
    down-projections whole, embedding / output layer on the first / last stage, padded vocabulary."""
    model = as_model(cfg)
    stage = stages(model.cfg, layout)[pp_rank]
    shard = Shard(layout.tp, layout.expert_tp, layout.ep, False)
    return model.params(stage.ranges, shard) + end_params(model.cfg, stage, vocab_rows(model.cfg, layout.tp,
                                                                                         vocab_divisible))


def vocab_rows(cfg: ModelConfig, tp: int, vocab_divisible: Optional[int] = None) -> int:
    """Rows of the embedding / output layer one TP rank holds: the padded vocabulary / tp."""
    return cfg.padded_vocab_size(tp, vocab_divisible) // tp


def end_params(cfg: ModelConfig, stage: Stage, rows: int) -> BlockParams:
    """The embedding (first stage) and final norm + output layer (last stage) with `rows` vocabulary rows."""
    h = cfg.hidden_size
    n = 0
    if stage.embedding:
        n += rows * h + (cfg.max_position_embeddings * h if cfg.position_embedding == "learned" else 0)
    if stage.head:
        n += _norm(cfg, h) + (rows * h if stage.output_layer else 0)
    return BlockParams(dense=n)


# ---- the whole model's parameters -------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # parameters touched per token (differs from total only with MoE)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact count of the whole model, without building it: the per-rank count at tp 1 on one stage, on
    the true (unpadded) vocabulary, tied embeddings once. A token touches top_k of each layer's routed
    experts (every expert of a block has the same size)."""
    stage = Stage(0, (), 1, True, True, not cfg.tie_embeddings)
    p = end_params(cfg, stage, cfg.vocab_size)
    for blocks, n in layer_kind_counts(cfg):
        for b in blocks:
            p += block_params(cfg, b, Shard(1, 1, 1, False)).times(n)
    active = p.total - p.expert + (p.expert * cfg.moe.top_k // cfg.moe.num_experts if p.expert else 0)
    return ParamCount(total=p.total, active=active)


def kv_width(cfg: ModelConfig) -> float:
    """Elements of K and V per token (all heads), what ring attention exchanges."""
    if cfg.mla is not None:
        m = cfg.mla
        return cfg.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return 2 * cfg.groups * cfg.kv_channels


# ---- LoRA adapters --------------------------------------------------------------------------------
def lora_params(cfg: ModelConfig, kinds: list[tuple[tuple[str, ...], int]], tp: int, rank: int,
                parts: frozenset) -> int:
    """This TP rank's adapter elements over layers of `kinds` (mzoo/parallel/lora.py): on a
    column-parallel base A [r, in] is whole and B [out / tp, r]; on a row-parallel one A [r, in / tp]
    and B [out, r] whole. Dense attention and MLPs only (experts carry none)."""
    h, d, ffn = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    rows = {"q": cfg.num_attention_heads * d, "k": cfg.groups * d, "v": cfg.groups * d}
    attention = sum(rank * h + rank * rows[p] // tp for p in ("q", "k", "v") if p in parts)
    if "proj" in parts:
        attention += rank * cfg.num_attention_heads * d // tp + h * rank
    fc1 = ("gate", "up") if cfg.gated else ("fc1",)
    mlp = sum(rank * h + rank * ffn // tp for p in fc1 if p in parts)
    if "fc2" in parts:
        mlp += rank * ffn // tp + h * rank
    total = 0
    for blocks, n in kinds:
        total += n * ((attention if "gqa" in blocks else 0) + (mlp if "mlp" in blocks else 0))
    return total
