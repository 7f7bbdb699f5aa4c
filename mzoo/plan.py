"""Parallel-layout planner: which (tp, pp, vpp, ep, cp, dp) to train a model with on N GPUs.

A first-principles model; every formula and constant is in docs/plan.md with the reason for it.

- Memory per GPU: exact per-rank parameter counts (the shards mzoo's models hold), gradients and
  optimizer states as a framework stores them (a `Profile`: Megatron-Core on GPUs, or mzoo's own
  engine), activations from the tensors each block saves for backward times the micro-batches in
  flight on the pipeline stage, plus logits, communication buffers and a fixed overhead.
- Step time: model FLOPs at a fraction of peak, TP / EP / CP / PP / DP communication at a fraction of
  link bandwidth (overlap rules in the docs), and the pipeline bubble.

Layouts are ranked by step time among those that fit; `explain` says why the best one wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional

from mzoo.config import ConfigError, ModelConfig, ParallelConfig
from mzoo.errors import UserError
from mzoo.parallel.cross_entropy import CHUNK_ELEMENTS as CE_CHUNK_ELEMENTS
from mzoo.parallel.pipeline import stage_layers

GIB = 2**30


# ---- hardware ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    """One accelerator of a node. Bandwidths are per GPU and per direction, in GB/s (1e9 B/s)."""

    name: str
    memory_gib: float  # what the driver reports as total (nvidia-smi), in GiB
    bf16_tflops: float  # dense (no sparsity) tensor-core peak
    fp8_tflops: Optional[float]  # None: no FP8 tensor cores
    hbm_tbps: float  # memory bandwidth, TB/s
    nvlink_gbps: float  # NVLink inside a node
    network_gbps: float  # one NIC per GPU across nodes (InfiniBand / RoCE)
    source: str


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100-80gb", 81559 / 1024, 989.4, 1978.9, 3.35, 450.0, 50.0,
        "NVIDIA H100 SXM5 datasheet (NVLink 4: 900 GB/s both ways); DGX H100: 8x ConnectX-7 400 Gb/s"),
    GPU("h200", 143771 / 1024, 989.4, 1978.9, 4.8, 450.0, 50.0,
        "NVIDIA H200 SXM datasheet (141 GB HBM3e, NVLink 900 GB/s); DGX H200: 8x ConnectX-7 400 Gb/s"),
    GPU("a100-80gb", 81920 / 1024, 312.0, None, 2.039, 300.0, 25.0,
        "NVIDIA A100 SXM4 80GB datasheet (NVLink 3: 600 GB/s both ways); DGX A100: 8x HDR 200 Gb/s"),
    GPU("b200", 183359 / 1024, 2250.0, 4500.0, 8.0, 900.0, 50.0,
        "NVIDIA HGX B200 datasheet (dense, per GPU; NVLink 5: 1.8 TB/s both ways); DGX B200: 8x ConnectX-7 400 Gb/s"),
)}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise UserError(f"unknown GPU '{name}'; use one of {', '.join(GPUS)}.")
    return GPUS[name]


# ---- constants (docs/plan.md says where each comes from) --------------------------------------------
GEMM_EFFICIENCY = 0.55  # of the bf16 peak, sustained by a whole transformer layer
ENGINE_EFFICIENCY = 0.37  # mzoo's eager pure-torch layers (torchtitan's eager class; docs/plan.md): unmeasured
HEADROOM = 0.05  # of a GPU's memory left free: allocator fragmentation and caching slack
FP8_EFFICIENCY = 0.40  # of the fp8 peak, for the linear layers under --fp8
LINK_EFFICIENCY = 0.80  # NCCL bus bandwidth / link bandwidth
HBM_EFFICIENCY = 0.80  # optimizer step: streaming reads and writes
COLLECTIVE_LATENCY_S = 10e-6  # fixed cost of launching one collective
MEGATRON_OVERHEAD_GIB = 4.0  # CUDA context, NCCL communicators, cuBLAS/TE workspaces, allocator slack
DDP_BUCKET_ELEMENTS = 40_000_000  # Megatron DDP bucket: max(40M, 1M x DP) elements
TOKENS_PER_BATCH = 4 * 2**20  # default global batch: about 4M tokens (Llama 3, GPT-3 scale)
MIN_CP_TOKENS = 1024  # context parallelism only down to this many tokens per rank (kernels stay efficient)
COMM_BYTES = 2  # activations travel in bf16
FP8_WEIGHT_BYTES = 2  # --fp8: Transformer Engine caches each weight in fp8, and its transpose


# ---- how a framework stores things ----------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """Bytes one framework keeps per parameter and per saved activation element."""

    name: str
    param: int  # weights
    grad: int  # the main-gradient buffer (Megatron's main_grad, mzoo's optimizer), never sharded
    master: int  # fp32 master copy (sharded by the distributed optimizer)
    moments: int  # Adam m + v
    act: int  # one saved activation element
    logits: int  # one (token, vocabulary row) at the loss, at its peak
    sequence_parallel: Optional[bool]  # None: on whenever tp > 1 (Megatron requires it for MoE)
    engine: bool  # mzoo's pure-torch blocks keep a few more copies (docs/plan.md, activations)
    selective: frozenset  # what --recompute selective recomputes
    overhead: int  # fixed bytes: CUDA context, NCCL communicators, library workspaces
    fp8: bool = False
    bucket_copy: bool = False  # gloo (the CPU engine) copies a gradient bucket inside each DP collective
    efficiency: float = GEMM_EFFICIENCY  # of the bf16 peak, sustained by a whole layer
    overlap_dp: bool = True  # DP reduce-scatter / all-gather hidden behind backward / forward

    @property
    def state_bytes(self) -> int:
        return self.param + self.grad + self.master + self.moments


def megatron_profile(grad_fp32: bool = True, fp8: bool = False) -> Profile:
    """Megatron-Core + Transformer Engine on GPUs: bf16 weights, an fp32 main_grad buffer (what
    Megatron-LM forces for bf16 runs and NeMo's bf16_mixed sets; `grad_fp32=False` is
    DistributedDataParallelConfig's bf16 default), fp32 master + Adam."""
    return Profile("megatron", param=2, grad=4 if grad_fp32 else 2, master=4, moments=8, act=2, logits=6,
                   sequence_parallel=None, engine=False, selective=frozenset({"core_attn", "layernorm", "mla_up_proj"}),
                   overhead=int(MEGATRON_OVERHEAD_GIB * GIB), fp8=fp8)


def engine_profile(precision: str = "fp32", sequence_parallel: bool = False, device: str = "cpu") -> Profile:
    """mzoo's own engine (mzoo/parallel/optimizer.py): parameters in the training dtype, the fp32
    main-gradient buffer, fp32 master + Adam m, v (sharded by the distributed optimizer), the same
    2 + 4 + 12/dp bytes as Megatron for bf16. The loss keeps the logits in their dtype and writes
    their gradient in place. On a GPU the runtime's fixed memory (CUDA context, NCCL, cuBLAS) is
    Megatron's; on the CPU it is part of the measured baseline, and gloo's DP collectives copy one
    fp32 bucket during the optimizer step (NCCL reduces the buffer in place)."""
    size = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    overhead = int(MEGATRON_OVERHEAD_GIB * GIB) if device == "cuda" else 0
    return Profile(f"mzoo-{precision}", param=size, grad=4, master=4, moments=8, act=size, logits=size,
                   sequence_parallel=sequence_parallel, engine=True, selective=frozenset({"core_attn"}),
                   overhead=overhead, bucket_copy=device != "cuda", efficiency=ENGINE_EFFICIENCY, overlap_dp=False)


# ---- layouts and settings ---------------------------------------------------------------------------
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


# ---- per-block parameters, activations and FLOPs --------------------------------------------------
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


def layer_blocks(cfg: ModelConfig, index: int) -> tuple[str, ...]:
    """The blocks of one layer: a transformer layer is attention + (MLP or MoE); hybrid layers one each."""
    kind = cfg.layer_types[index]
    if kind == "transformer":
        return ("mla" if cfg.mla is not None else "gqa", "moe" if cfg.is_moe_layer(index) else "mlp")
    return {"attention": ("gqa",), "mlp": ("mlp",), "moe": ("moe",), "mamba": ("mamba",)}[kind]


def block_params(cfg: ModelConfig, block: str, s: Shard) -> BlockParams:
    """Parameters one rank holds for one block, exactly as mzoo's models shard them."""
    h, t, bias = cfg.hidden_size, s.tp, cfg.add_bias_linear
    if block == "gqa":
        a, g, d = cfg.num_attention_heads, cfg.groups, cfg.kv_channels
        rows = (a + 2 * g) * d // t
        n = _norm(cfg, h) + rows * h + (rows if cfg.add_qkv_bias or bias else 0)
        n += h * a * d // t + (h if bias else 0) + (2 * _norm(cfg, d) if cfg.qk_layernorm else 0)
        return BlockParams(dense=n)
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
        dense = _norm(cfg, h) + moe.num_experts * h + (_mlp(cfg, shared_ffn, t, bias) if shared_ffn else 0)
        expert = moe.num_experts // s.ep * _mlp(cfg, moe.ffn_hidden_size, s.etp, False)  # experts carry no bias
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
        return e * (norm() + qkv + rope + out + lse)
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
    halving), like mzoo.train.trainer.flops_per_token."""
    h = cfg.hidden_size
    if block == "gqa":
        a, g, d = cfg.num_attention_heads, cfg.groups, cfg.kv_channels
        return BlockFlops(2 * h * (a + 2 * g) * d + 2 * a * d * h, 4 * a * d * seq_len)
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


def _mlp_flops(cfg: ModelConfig, ffn: int) -> float:
    return 2 * cfg.hidden_size * ffn * (3 if cfg.gated else 2)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (3 x forward: backward is twice the forward), without recomputation;
    the same quantity as mzoo.train.trainer.flops_per_token (exact per block, MLA and SSM included)."""
    fwd = 2.0 * cfg.hidden_size * cfg.vocab_size  # output layer (tied or not, the logits are a GEMM)
    for i in range(cfg.num_layers):
        for block in layer_blocks(cfg, i):
            f = block_flops(cfg, block, seq_len)
            fwd += f.gemm + f.core
    return 3.0 * fwd


# ---- one model's costs, cached per block kind -------------------------------------------------------
class Model:
    """A ModelConfig with its per-layer block kinds and a memo of per-block results, so that ranking
    thousands of layouts stays fast (every layer of one kind costs the same)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.blocks = [layer_blocks(cfg, i) for i in range(cfg.num_layers)]
        self._memo: dict = {}

    def _cached(self, key: tuple, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def kinds(self, layers: tuple[int, ...]) -> list[tuple[tuple[str, ...], int]]:
        """(blocks of a layer, how many layers of that kind) over some layers."""
        def count():
            out: dict[tuple[str, ...], int] = {}
            for i in layers:
                out[self.blocks[i]] = out.get(self.blocks[i], 0) + 1
            return list(out.items())
        return self._cached(("kinds", layers), count)

    def params(self, layers: tuple[int, ...], s: Shard) -> BlockParams:
        def total():
            out = BlockParams()
            for blocks, n in self.kinds(layers):
                for b in blocks:
                    out += block_params(self.cfg, b, s).times(n)
            return out
        return self._cached(("params", layers, s), total)

    def layer_activations(self, blocks: tuple[str, ...], s: Shard, profile: Profile, modules: frozenset) -> float:
        return self._cached(("acts", blocks, s, profile, modules),
                            lambda: sum(block_activations(self.cfg, b, s, profile, modules) for b in blocks))

    def flops(self, block: str, seq_len: int) -> BlockFlops:
        return self._cached(("flops", block, seq_len), lambda: block_flops(self.cfg, block, seq_len))

    def model_flops(self, seq_len: int) -> float:
        return self._cached(("model_flops", seq_len), lambda: model_flops_per_token(self.cfg, seq_len))


def _model(cfg) -> Model:
    return cfg if isinstance(cfg, Model) else Model(cfg)


# ---- one rank's parameters ------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """What one pipeline rank holds: its layers (all virtual chunks) and the embedding / head."""

    rank: int
    layers: tuple[int, ...]
    chunks: int
    embedding: bool  # the first chunk of the first stage
    head: bool  # the last chunk of the last stage: final norm, output layer, loss
    output_layer: bool  # false when the head reuses the tied embedding of the same chunk


def stages(cfg: ModelConfig, layout: Layout) -> list[Stage]:
    ranges = stage_layers(cfg.num_layers, layout.pp, layout.vpp, layout.first, layout.last)
    out = []
    for p, chunks in enumerate(ranges):
        layers = tuple(i for r in chunks for i in r)
        first, last = p == 0, p == layout.pp - 1
        same_chunk = first and last and len(chunks) == 1
        out.append(Stage(p, layers, len(chunks), first, last, last and not (cfg.tie_embeddings and same_chunk)))
    return out


def rank_params(cfg: ModelConfig, layout: Layout, pp_rank: int, vocab_divisible: Optional[int] = None) -> BlockParams:
    """Exact parameter count of one rank of pipeline stage `pp_rank` (every TP / EP rank of a stage
    holds the same number): sharded tensors / tp, experts / ep, norms, routers and MLA
    down-projections whole, embedding / output layer on the first / last stage, padded vocabulary."""
    model = _model(cfg)
    stage = stages(model.cfg, layout)[pp_rank]
    shard = Shard(layout.tp, layout.expert_tp, layout.ep, False)
    return model.params(stage.layers, shard) + _ends(model.cfg, stage, layout.tp, vocab_divisible)


def _ends(cfg: ModelConfig, stage: Stage, tp: int, vocab_divisible: Optional[int] = None) -> BlockParams:
    h = cfg.hidden_size
    rows = cfg.padded_vocab_size(tp, vocab_divisible) // tp
    n = 0
    if stage.embedding:
        n += rows * h + (cfg.max_position_embeddings * h if cfg.position_embedding == "learned" else 0)
    if stage.head:
        n += _norm(cfg, h) + (rows * h if stage.output_layer else 0)
    return BlockParams(dense=n)


# ---- memory ----------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Bytes on one GPU (the busiest pipeline stage). Saved activations and buffers live through
    forward/backward; the loss's logits peak in the forward of the last stage and the recomputed
    layer (full recomputation) in backward, so only the larger of those two counts; step temporaries
    live only inside the optimizer step, when no activation is alive."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    recompute_working: float
    logits: float
    buffers: float
    step_temporaries: float  # alive only inside the optimizer step, when no activation is
    overhead: float
    stage: int = 0
    params: int = 0

    @property
    def total(self) -> float:
        live = self.activations + self.buffers + max(self.logits, self.recompute_working)
        return self.weights + self.gradients + self.optimizer + self.overhead + max(live, self.step_temporaries)

    def parts(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("weights", "gradients", "optimizer", "activations", "recompute_working",
                                               "logits", "buffers", "step_temporaries", "overhead")}

    def largest(self) -> str:
        return max(self.parts().items(), key=lambda kv: kv[1])[0]

    def as_dict(self) -> dict:
        return {"total_gb": round(self.total / GIB, 3), "stage": self.stage, "params": self.params,
                **{f"{k}_gb": round(v / GIB, 3) for k, v in self.parts().items()}}


def _sequence_parallel(profile: Profile, tp: int) -> bool:
    return tp > 1 if profile.sequence_parallel is None else (profile.sequence_parallel and tp > 1)


def _recompute_modules(profile: Profile, settings: Settings) -> frozenset:
    if settings.recompute != "selective":
        return frozenset()
    return settings.recompute_modules if settings.recompute_modules is not None else profile.selective


def _stage_activations(model: Model, stage: Stage, shard: Shard, profile: Profile,
                       settings: Settings) -> tuple[float, float]:
    """(bytes per token of one micro-batch over the stage's layers, extra working bytes per token
    held once: the layer or block being recomputed)."""
    modules = _recompute_modules(profile, settings)
    kinds = model.kinds(stage.layers)
    per_kind = [(model.layer_activations(blocks, shard, profile, modules), n) for blocks, n in kinds]
    if settings.recompute != "full":
        working = 0.0
        if modules & {"mlp", "moe"}:  # the recomputed block's activations, one at a time in backward
            working = max((block_activations(model.cfg, b, shard, profile, frozenset())
                           for blocks, _ in kinds for b in blocks if b in modules), default=0.0)
        return sum(a * n for a, n in per_kind), working
    kept = profile.act * model.cfg.hidden_size * (1.0 / shard.tp if shard.sp else 1.0)  # each layer's input
    layers = len(stage.layers)
    recomputed = layers if settings.recompute_layers is None else min(layers, settings.recompute_layers * stage.chunks)
    whole = sum(a * n for a, n in per_kind) / max(1, layers)  # the rest keep everything (average layer)
    return kept * recomputed + whole * (layers - recomputed), max((a for a, _ in per_kind), default=0.0)


def in_flight(layout: Layout, pp_rank: int, microbatches: int) -> float:
    """Micro-batches whose activations a stage holds at its peak, in units of the whole stage:
    1F1B: pp - rank; interleaved: Megatron's warm-up ((pp - rank - 1) * 2 + (vpp - 1) * pp + 1)
    chunks of 1/vpp stage each (rank 0: Korthikanti's pp * (1 + (pp - 1) / (pp * vpp)))."""
    pp, vpp = layout.pp, layout.vpp
    if vpp == 1:
        return float(min(pp - pp_rank, microbatches))
    chunks = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, microbatches * vpp)
    return chunks / vpp


def stage_memory(cfg, layout: Layout, settings: Settings, profile: Profile, stage: Stage) -> Memory:
    model = _model(cfg)
    cfg = model.cfg
    sp = _sequence_parallel(profile, layout.tp)
    shard = Shard(layout.tp, layout.expert_tp, layout.ep, sp)
    params = model.params(stage.layers, replace(shard, sp=False)) + _ends(cfg, stage, layout.tp)
    dense_shards = layout.dp * layout.cp if settings.distributed_optimizer else 1
    expert_shards = layout.expert_dp if settings.distributed_optimizer else 1
    trained = params.dense + params.expert
    opt_elements = params.dense / dense_shards + params.expert / expert_shards
    weights = trained * (profile.param + (FP8_WEIGHT_BYTES if profile.fp8 else 0)) + params.frozen * 4
    gradients = trained * profile.grad
    optimizer = opt_elements * (profile.master + profile.moments)

    T = settings.tokens(layout)
    m = settings.microbatches(layout)
    per_token, working = _stage_activations(model, stage, shard, profile, settings)
    activations = T * per_token * in_flight(layout, stage.rank, m)
    h, e, sh = cfg.hidden_size, profile.act, (1.0 / layout.tp if sp else 1.0)
    logits = 0.0
    if stage.head:  # the final norm and the output layer's input, then the loss at its peak
        slice_ = T * cfg.padded_vocab_size(layout.tp) / layout.tp
        logits = T * e * norm_activations(h, sh, profile, sp) + profile.logits * slice_
        if profile.engine:  # the loss's fp32 working copy of one chunk of rows
            logits += 4 * min(slice_, CE_CHUNK_ELEMENTS)
    buffers = _buffers(model, layout, settings, profile, stage, params, T, sp, m)
    step = 0.0
    if profile.bucket_copy and max(dense_shards if settings.distributed_optimizer else layout.dp * layout.cp,
                                   layout.expert_dp) > 1:
        step = 4 * min(DDP_BUCKET_ELEMENTS, max(params.dense, params.expert))  # gloo's copy of one fp32 bucket
    return Memory(weights, gradients, optimizer, activations, T * working, logits, buffers,
                  step, profile.overhead, stage.rank, params.total)


def _buffers(model: Model, layout: Layout, settings: Settings, profile: Profile, stage: Stage,
             params: BlockParams, T: int, sp: bool, m: int) -> float:
    """Communication buffers alive during forward/backward (docs/plan.md)."""
    cfg = model.cfg
    h, e = cfg.hidden_size, profile.act
    sh = 1.0 / layout.tp if sp else 1.0
    blocks = {b for kind, _ in model.kinds(stage.layers) for b in kind}
    out = 0.0
    if sp and not profile.engine:  # the all-gathered input of the linear being computed
        out += T * h * e
    if layout.ep > 1 and "moe" in blocks:  # all-to-all send + receive
        out += 2 * cfg.moe.top_k * T * sh * h * e
    if layout.cp > 1:  # ring attention: K/V chunks in flight (double buffered)
        out += 2 * T * _kv_width(cfg) / layout.tp * e
    if layout.pp > 1:  # p2p send + receive of one micro-batch's hidden state
        out += 2 * T * h * sh * e
    shards = layout.dp * layout.cp
    if settings.distributed_optimizer and shards > 1 and not profile.engine:  # param all-gather bucket
        out += min(max(DDP_BUCKET_ELEMENTS, 1_000_000 * shards), params.dense + params.expert) * profile.param
    if profile.engine:  # autograd's .grad of one parameter, alive until the hook adds it to the main grad
        out += _largest_param(cfg, layout, stage, blocks) * profile.param
    return out


def _kv_width(cfg: ModelConfig) -> float:
    """Elements of K and V per token (all heads), what ring attention exchanges."""
    if cfg.mla is not None:
        m = cfg.mla
        return cfg.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return 2 * cfg.groups * cfg.kv_channels


def _largest_param(cfg: ModelConfig, layout: Layout, stage: Stage, blocks: set) -> int:
    h, t = cfg.hidden_size, layout.tp
    sizes = [cfg.padded_vocab_size(t) // t * h] if (stage.embedding or stage.output_layer) else []
    if "mlp" in blocks:
        sizes.append(h * cfg.ffn_hidden_size * (2 if cfg.gated else 1) // t)
    if "gqa" in blocks:
        sizes.append(h * (cfg.num_attention_heads + 2 * cfg.groups) * cfg.kv_channels // t)
    if "moe" in blocks:
        sizes.append(max(h * cfg.moe.ffn_hidden_size * (2 if cfg.gated else 1) // layout.expert_tp,
                         h * cfg.moe.num_experts))
    if "mamba" in blocks:
        sizes.append(h * cfg.mamba_dims()["in_proj"] // t)
    if "mla" in blocks:
        sizes.append(cfg.num_attention_heads * cfg.mla.v_head_dim * h // t)
    return max(sizes, default=0)


def memory(cfg, layout: Layout, settings: Settings, profile: Profile) -> Memory:
    """The busiest pipeline stage's memory."""
    model = _model(cfg)
    return max((stage_memory(model, layout, settings, profile, s) for s in stages(model.cfg, layout)),
               key=lambda mm: mm.total)


# ---- time --------------------------------------------------------------------------------------------
@dataclass
class StepTime:
    """Seconds. Per-micro-batch parts are those of the slowest pipeline stage."""

    compute: float
    tp_comm: float
    ep_comm: float
    cp_comm: float
    pp_comm: float
    microbatches: int
    bubble: float  # fraction of the step the pipeline is idle: (pp - 1) / (m * vpp + pp - 1)
    dp_comm: float  # exposed data-parallel gradient / parameter traffic
    optimizer: float
    step: float
    mfu: float
    tokens_per_s: float
    stage: int = 0

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    def parts(self) -> dict[str, float]:
        """Seconds per step spent in each part (per-micro-batch parts times the micro-batches)."""
        m = self.microbatches
        return {"compute": self.compute * m, "tp_comm": self.tp_comm * m, "ep_comm": self.ep_comm * m,
                "cp_comm": self.cp_comm * m, "pp_comm": self.pp_comm * m, "bubble": self.step * self.bubble,
                "dp_comm": self.dp_comm, "optimizer": self.optimizer}


def _bandwidth(g: GPU, span: int, gpus_per_node: int) -> float:
    """Bytes/s of a group whose ranks span `span` consecutive global ranks."""
    return (g.nvlink_gbps if span <= gpus_per_node else g.network_gbps) * 1e9 * LINK_EFFICIENCY


def _ring(bytes_: float, n: int, bw: float) -> float:
    """All-gather or reduce-scatter of a `bytes_` buffer over n ranks (ring: (n - 1) / n of it moves)."""
    return 0.0 if n <= 1 else bytes_ * (n - 1) / n / bw + COLLECTIVE_LATENCY_S


def _tp_traffic(cfg: ModelConfig, block: str, etp_is_tp: bool) -> tuple[float, float, int]:
    """(forward, backward) elements per token moved through TP collectives (each the full, gathered
    size) and the number of collectives, for Megatron with sequence parallelism."""
    h = cfg.hidden_size
    if block == "mla":
        m = cfg.mla
        latents = (m.q_lora_rank or h) + m.kv_lora_rank + m.qk_rope_head_dim
        return latents + h, 2 * latents + h, 10
    if block == "moe":
        moe = cfg.moe
        shared = (2 * h, 3 * h) if moe.num_shared_experts else (0, 0)
        routed = 2 * moe.top_k * h if etp_is_tp else 0
        return routed + shared[0], routed + shared[1], 9
    return 2 * h, 3 * h, 5  # gqa, mlp, mamba: AG + RS forward; AG, RS, AG backward


@dataclass
class _StageTime:
    compute: float
    tp: float
    ep: float
    cp: float
    pp: float
    dp: float
    optimizer: float

    @property
    def per_microbatch(self) -> float:
        return self.compute + self.tp + self.ep + self.cp + self.pp


def step_time(cfg, layout: Layout, settings: Settings, g: GPU, profile: Profile) -> StepTime:
    """Slowest stage's time per micro-batch x (m * vpp + pp - 1) / vpp, plus the largest exposed DP
    traffic and optimizer step. MFU = model FLOPs / (GPUs x bf16 peak x step time)."""
    model = _model(cfg)
    times = [_stage_time(model, layout, settings, g, profile, s) for s in stages(model.cfg, layout)]
    slowest = max(range(len(times)), key=lambda i: times[i].per_microbatch)
    s = times[slowest]
    m = settings.microbatches(layout)
    slots = (m * layout.vpp + layout.pp - 1) / layout.vpp
    tail = max(t.dp + t.optimizer for t in times)
    step = slots * s.per_microbatch + tail
    bubble = (layout.pp - 1) / (m * layout.vpp + layout.pp - 1)
    tokens = settings.global_batch * settings.seq_len
    mfu = model.model_flops(settings.seq_len) * tokens / (layout.world * g.bf16_tflops * 1e12 * step)
    dp = max(t.dp for t in times)
    return StepTime(s.compute, s.tp, s.ep, s.cp, s.pp, m, bubble, dp, tail - dp, step, mfu, tokens / step, slowest)


def _stage_time(model: Model, layout: Layout, settings: Settings, g: GPU, profile: Profile, stage: Stage) -> _StageTime:
    cfg = model.cfg
    T, t, gpn = settings.tokens(layout), layout.tp, settings.gpus_per_node
    rate_gemm = (g.fp8_tflops * FP8_EFFICIENCY if settings.fp8 else g.bf16_tflops * profile.efficiency) * 1e12
    rate_core = g.bf16_tflops * profile.efficiency * 1e12
    sh = 1.0 / t if _sequence_parallel(profile, t) else 1.0
    selective, modules = settings.recompute == "selective", _recompute_modules(profile, settings)
    full = 0.0  # the share of layers recomputed whole
    if settings.recompute == "full":
        layers = max(1, len(stage.layers))
        full = 1.0 if settings.recompute_layers is None else min(1.0, settings.recompute_layers * stage.chunks / layers)
    gemm = core = extra = tp_elems = tp_calls = ep = cp_exposed = 0.0
    for blocks, n in model.kinds(stage.layers):
        for block in blocks:
            f = model.flops(block, settings.seq_len)
            gemm, core = gemm + n * f.gemm, core + n * f.core
            if selective:
                core_again = f.core / rate_core if block in ("gqa", "mla") and "core_attn" in modules else 0.0
                block_again = f.gemm / rate_gemm if block in modules else 0.0  # a whole MLP / MoE again
                ups = f.recompute_selective / rate_gemm if "mla_up_proj" in modules else 0.0
                extra += n * (ups + core_again + block_again)
            if t > 1:
                fwd, bwd, calls = _tp_traffic(cfg, block, layout.expert_tp == t)
                tp_elems += n * (fwd * (1 + full) + bwd)
                tp_calls += n * calls
            if block == "moe" and layout.ep > 1:
                a2a = _all_to_all(cfg.moe.top_k * T * sh * cfg.hidden_size * COMM_BYTES, layout, g, gpn)
                ep += n * (4 + 2 * full) * a2a
            if block in ("gqa", "mla") and layout.cp > 1:
                kv = T * _kv_width(cfg) / t * COMM_BYTES
                ring = 3 * (layout.cp - 1) * kv / _bandwidth(g, t * layout.cp, gpn)  # fwd K, V; bwd K, V + grads
                cp_exposed += n * max(0.0, ring - 3 * f.core * T / t / rate_core)
    if stage.head:
        gemm += 2.0 * cfg.hidden_size * cfg.padded_vocab_size(t)
    fwd_time = (gemm / rate_gemm + core / rate_core) * T / t
    compute = fwd_time * (3 + full) + extra * T / t
    tp = 0.0
    if t > 1:
        tp = tp_elems * T * COMM_BYTES * (t - 1) / t / _bandwidth(g, t, gpn) + tp_calls * COLLECTIVE_LATENCY_S
    pp = 0.0
    if layout.pp > 1:
        bw_pp = _bandwidth(g, 2 * t * layout.cp * layout.dp, gpn)
        pp = 2 * layout.vpp * (T * cfg.hidden_size * sh * COMM_BYTES / bw_pp + COLLECTIVE_LATENCY_S)
    dp, opt = _dp_and_optimizer(model, layout, settings, g, profile, stage, fwd_time, 2 * fwd_time)
    return _StageTime(compute, tp, ep, cp_exposed, pp, dp, opt)


def _all_to_all(bytes_per_rank: float, layout: Layout, g: GPU, gpn: int) -> float:
    """One all-to-all over the EP group: the share for ranks on other nodes crosses the network, the
    rest NVLink, both at once. EP ranks are `etp` apart (expert TP ranks are fastest)."""
    ep = layout.ep
    local = max(1, min(ep, gpn // layout.expert_tp))
    nv = bytes_per_rank * (local - 1) / ep / (g.nvlink_gbps * 1e9 * LINK_EFFICIENCY)
    net = bytes_per_rank * (ep - local) / ep / (g.network_gbps * 1e9 * LINK_EFFICIENCY)
    return max(nv, net) + COLLECTIVE_LATENCY_S


def _dp_and_optimizer(model: Model, layout: Layout, settings: Settings, g: GPU, profile: Profile, stage: Stage,
                      fwd: float, bwd: float) -> tuple[float, float]:
    """Exposed DP traffic and optimizer-step time of one stage. Megatron reduces gradients
    (reduce-scatter with the distributed optimizer, all-reduce without) during the last micro-batch's
    backward and all-gathers parameters during the next step's first forward, so only what does not
    fit is exposed; mzoo's engine does neither yet (`Profile.overlap_dp`)."""
    shard = Shard(layout.tp, layout.expert_tp, layout.ep, False)
    params = model.params(stage.layers, shard) + _ends(model.cfg, stage, layout.tp)
    bw = _bandwidth(g, layout.tp * layout.cp * layout.dp, settings.gpus_per_node)
    groups = ((params.dense, layout.dp * layout.cp), (params.expert, layout.expert_dp))
    reduce = gather = elements = 0.0
    for n, size in groups:
        if settings.distributed_optimizer:
            reduce += _ring(n * profile.grad, size, bw)
            gather += _ring(n * profile.param, size, bw)
            elements += n / size
        else:
            reduce += 2 * _ring(n * profile.grad, size, bw)
            elements += n
    if profile.overlap_dp:
        exposed = max(0.0, reduce - bwd) + max(0.0, gather - fwd)
    else:  # mzoo's engine reduces after the whole backward and gathers after the step: all exposed
        exposed = reduce + gather
    per_element = profile.grad + 2 * (profile.master + profile.moments) + profile.param
    return exposed, elements * per_element / (g.hbm_tbps * 1e12 * HBM_EFFICIENCY)


# ---- validity ------------------------------------------------------------------------------------------
def problems(cfg: ModelConfig, layout: Layout, settings: Settings, gpus: Optional[int] = None) -> list[str]:
    """Why this layout cannot run this model with these settings (one sentence each); [] if it can."""
    out: list[str] = []
    if gpus is not None and layout.world != gpus:
        out.append(f"tp x pp x cp x dp = {layout.world}, not the {gpus} GPUs asked for.")
    for name in ("tp", "pp", "dp", "vpp", "ep", "cp"):
        if getattr(layout, name) < 1:
            return out + [f"{name} must be at least 1."]
    try:
        layout.parallel_config().validate_for(cfg)
    except ConfigError as e:
        out.append(str(e))
    if cfg.ssm is not None and cfg.ssm.version == 1 and cfg.mamba_dims()["d_inner"] % layout.tp:
        out.append(f"tp={layout.tp} does not divide the Mamba inner size {cfg.mamba_dims()['d_inner']}.")
    gpn = settings.gpus_per_node
    if layout.tp > gpn or (layout.world >= gpn and gpn % layout.tp):
        out.append(f"tp={layout.tp} must divide the {gpn} GPUs of a node: TP's per-layer collectives need NVLink.")
    if cfg.moe is not None and layout.ep >= 1:
        pool = layout.dp * layout.cp * (layout.tp // layout.expert_tp)
        if pool % layout.ep:
            what = "dp x cp" if layout.expert_tp == layout.tp else "tp x dp x cp"
            out.append(f"ep={layout.ep} must divide {what} = {pool}: expert-parallel groups are carved out of "
                       "those ranks.")
        if layout.expert_tp not in (1, layout.tp):
            out.append(f"expert tp must be 1 or tp, not {layout.expert_tp}.")
    try:
        stage_layers(cfg.num_layers, layout.pp, layout.vpp, layout.first, layout.last)
    except ConfigError as e:
        out.append(str(e))
    if layout.cp > 1 and settings.seq_len % (2 * layout.cp):
        out.append(f"cp={layout.cp} needs the sequence ({settings.seq_len}) to split into 2 x cp equal chunks.")
    elif layout.cp > 1 and settings.seq_len // layout.cp < MIN_CP_TOKENS:
        out.append(f"cp={layout.cp} leaves {settings.seq_len // layout.cp} tokens per rank, fewer than "
                   f"{MIN_CP_TOKENS}: too little work per GPU for the attention and GEMM kernels.")
    if layout.tp > 1 and (settings.seq_len // layout.cp) % layout.tp:
        out.append(f"sequence parallelism needs seq_len / cp ({settings.seq_len // layout.cp}) divisible by "
                   f"tp={layout.tp}.")
    if settings.global_batch % (settings.micro_batch * layout.dp):
        out.append(f"global batch {settings.global_batch} is not a multiple of micro batch {settings.micro_batch} "
                   f"x dp {layout.dp}.")
    elif layout.vpp > 1 and settings.microbatches(layout) % layout.pp:
        out.append(f"interleaved pipelining needs the {settings.microbatches(layout)} micro-batches to be a "
                   f"multiple of pp={layout.pp}.")
    return out


# ---- plans ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One layout on one GPU type: why it cannot run, or its memory and step time."""

    layout: Layout
    gpu: GPU
    problems: list[str]
    memory: Optional[Memory] = None
    time: Optional[StepTime] = None
    headroom: float = HEADROOM
    engine: str = "megatron"  # the profile's name: megatron, or mzoo-bf16 / mzoo-fp32 ...

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def usable_gib(self) -> float:
        return self.gpu.memory_gib * (1 - self.headroom)

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.usable_gib * GIB

    @property
    def feasible(self) -> bool:
        return self.valid and self.fits

    def verdict(self) -> str:
        """One sentence: fits, or the first reason it cannot run, or which component overflows."""
        if not self.valid:
            return "not valid: " + self.problems[0]
        mem, cap = self.memory, self.usable_gib
        room = f" ({self.headroom:.0%} of {self.gpu.memory_gib:.1f} kept free)" if self.headroom else ""
        if self.fits:
            return f"fits: {mem.total / GIB:.1f} of {cap:.1f} GiB{room} on pipeline stage {mem.stage}."
        part = mem.largest()
        return (f"does not fit: pipeline stage {mem.stage} needs {mem.total / GIB:.1f} GiB but the {self.gpu.name} "
                f"offers {cap:.1f}{room}; the largest part is {part.replace('_', ' ')} "
                f"({getattr(mem, part) / GIB:.1f} GiB).")

    def as_dict(self) -> dict:
        lay = self.layout
        out = {"engine": self.engine, "gpu": self.gpu.name, "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "ep": lay.ep, "etp": lay.expert_tp,
               "cp": lay.cp, "dp": lay.dp, "first_stage_layers": lay.first, "last_stage_layers": lay.last,
               "label": lay.label(), "valid": self.valid, "feasible": self.feasible, "mzoo_engine": lay.mzoo_engine,
               "verdict": self.verdict(), "problems": self.problems,
               "memory_gb": round(self.memory.total / GIB, 3) if self.memory else None,
               "capacity_gb": round(self.gpu.memory_gib, 3), "usable_gb": round(self.usable_gib, 3),
               "mfu": round(self.time.mfu, 4) if self.time else None,
               "step_s": round(self.time.step, 4) if self.time else None}
        out["memory"] = self.memory.as_dict() if self.memory else None
        out["time"] = self.time.as_dict() if self.time else None
        return out


def evaluate(cfg, layout: Layout, settings: Settings, g: GPU, gpus: Optional[int] = None,
             profile: Optional[Profile] = None) -> Plan:
    """Memory and time of one layout (the best uneven split when the layers do not divide pp and none
    is given)."""
    model = _model(cfg)
    cfg = model.cfg
    profile = profile or megatron_profile(settings.grad_fp32, settings.fp8)
    if layout.pp > 1 and layout.first is None and layout.last is None and cfg.num_layers % layout.pp:
        splits = [replace(layout, first=a, last=b) for a, b in uneven_splits(cfg.num_layers, layout.pp)]
        if splits and layout.vpp == 1:
            return min((evaluate(model, s, settings, g, gpus, profile) for s in splits), key=rank_key)
    found = problems(cfg, layout, settings, gpus)
    if profile.engine:
        found += engine_problems(layout, settings)
    if found:
        return Plan(layout, g, found, headroom=settings.headroom, engine=profile.name)
    return Plan(layout, g, [], memory(model, layout, settings, profile), step_time(model, layout, settings, g, profile),
                settings.headroom, profile.name)


def engine_problems(layout: Layout, settings: Settings) -> list[str]:
    """What mzoo's engine cannot run yet (Megatron-Core can)."""
    out = []
    if layout.cp > 1:
        out.append(f"mzoo's engine has no context parallelism yet (cp={layout.cp}); Megatron-Core runs this layout.")
    if layout.expert_tp != layout.tp:
        out.append(f"mzoo's engine runs experts with TP = tp, not expert TP {layout.expert_tp}; Megatron-Core runs "
                   "this layout.")
    if settings.fp8:
        out.append("mzoo's engine has no FP8 (Transformer Engine) path yet.")
    return out


def uneven_splits(layers: int, pp: int) -> list[tuple[int, int]]:
    """(first, last) stage sizes with every middle stage holding ceil(layers / pp) layers and the ends
    at most that (Megatron's --decoder-first/last-pipeline-num-layers), e.g. 61 over 16: (1..4, 4..1)."""
    if pp < 2:
        return []
    per = math.ceil(layers / pp)
    rest = layers - per * (pp - 2)
    return [(f, rest - f) for f in range(1, per + 1) if 1 <= rest - f <= per]


def rank_key(p: Plan) -> tuple:
    """Feasible first, by step time; then the rest by memory."""
    if p.feasible:
        return (0, p.time.step, p.memory.total)
    if p.valid:
        return (1, p.memory.total, 0.0)
    return (2, 0.0, 0.0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: ModelConfig, gpus: int, settings: Settings) -> Iterator[Layout]:
    """Every (tp, pp, cp, dp, vpp, ep, etp) with tp * pp * cp * dp = gpus (uneven splits in evaluate)."""
    experts = cfg.moe.num_experts if cfg.moe is not None else 1
    for tp in _divisors(gpus):
        if tp > settings.gpus_per_node:
            continue
        for pp in _divisors(gpus // tp):
            if pp > cfg.num_layers:
                continue
            even = pp > 1 and cfg.num_layers % pp == 0
            vpps = [v for v in _divisors(cfg.num_layers // pp) if v > 1] if even else []
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                for vpp in [1] + vpps:
                    for ep in _divisors(experts):
                        for etp in ([tp, 1] if (cfg.moe is not None and tp > 1) else [tp]):
                            yield Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, ep=ep, cp=cp, etp=etp)


def plan(cfg: ModelConfig, gpus: int, settings: Settings, g: GPU, profile: Optional[Profile] = None) -> list[Plan]:
    """Every valid layout for one engine (`profile`: Megatron-Core + TE unless given), evaluated and
    ranked (feasible by step time first). One sentence and no work when no layout of `gpus` GPUs is
    valid for this model."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}.")
    if settings.fp8 and g.fp8_tflops is None:
        raise UserError(f"the {g.name} has no FP8 tensor cores; drop --fp8 or pick another --gpu.")
    profile = profile or megatron_profile(settings.grad_fp32, settings.fp8)
    model = Model(cfg)
    best: dict[tuple, Plan] = {}
    reasons: dict[str, int] = {}
    for layout in candidates(cfg, gpus, settings):
        found = problems(cfg, layout, settings, gpus) + (engine_problems(layout, settings) if profile.engine else [])
        if found and not (layout.pp > 1 and cfg.num_layers % layout.pp and _only_split(found)):
            reasons[found[0]] = reasons.get(found[0], 0) + 1
            continue
        p = evaluate(model, layout, settings, g, gpus, profile)
        if not p.valid:
            reasons[p.problems[0]] = reasons.get(p.problems[0], 0) + 1
            continue
        key = layout.key()
        if key not in best or rank_key(p) < rank_key(best[key]):
            best[key] = p
    if not best:
        common = max(reasons.items(), key=lambda kv: kv[1])[0] if reasons else "no candidate layout exists."
        raise UserError(f"no layout of {gpus} GPUs is valid for {cfg.name or 'this model'} with these settings; "
                        f"the most common reason: {common[0].lower() + common[1:]}")
    return sorted(best.values(), key=rank_key)


def _only_split(found: list[str]) -> bool:
    """The only problem is an uneven layer split, which evaluate() resolves with first/last sizes."""
    return all("do not split evenly" in f for f in found)


# ---- explanation ----------------------------------------------------------------------------------------
def explain(plans: list[Plan]) -> str:
    """One paragraph on the top layout: what it costs, and for tp, pp, ep and cp what the fastest layout
    with a smaller / larger value (the first such row of these plans) would lose: it does not fit, or
    it is slower, and because of what."""
    if not plans:
        return "no valid layout."
    best = plans[0]
    if not best.feasible:
        return (f"No layout fits: the smallest, {best.layout.label()}, {best.verdict()[len('does not fit: '):]} "
                "Add GPUs, use --recompute full, shorter sequences, or a GPU with more memory.")
    lay, mem, tm = best.layout, best.memory, best.time
    text = [f"{lay.label()} is the fastest layout that fits: {mem.total / GIB:.1f} of {best.usable_gib:.1f} GiB "
            f"on its busiest GPU (stage {mem.stage}), {seconds(tm.step)} per step, MFU {tm.mfu:.1%}, pipeline bubble "
            f"{tm.bubble:.1%}."]
    others = [p for p in plans if p is not best and p.valid]
    dims = ("tp", "pp", "ep", "cp") if any(p.layout.ep > 1 for p in plans) else ("tp", "pp", "cp")

    for dim in dims:
        own = getattr(lay, dim)
        for pick in ([p for p in others if getattr(p.layout, dim) < own],
                     [p for p in others if getattr(p.layout, dim) > own]):
            if not pick:
                continue
            alt = min(pick, key=rank_key)  # the fastest such layout: the one a table of these plans shows first
            head = f"With {dim}={getattr(alt.layout, dim)} the best is {alt.layout.label()}"
            if not alt.fits:
                part = alt.memory.largest().replace("_", " ")
                text.append(f"{head}, which does not fit ({alt.memory.total / GIB:.0f} GiB; largest part: {part}).")
                continue
            slower = alt.time.step / tm.step - 1
            if slower < 0.005:
                more = "more" if alt.memory.total > mem.total else "less"
                text.append(f"{head}, as fast (within 0.5%) with {more} memory ({alt.memory.total / GIB:.0f} GiB).")
            else:
                text.append(f"{head}, {_slower(alt.time.step / tm.step)} ({_main_difference(tm, alt.time)}).")
    return " ".join(text)


def seconds(x: float) -> str:
    """1.23 s, 45.6 ms, 78 µs."""
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.1f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} µs"


def _slower(ratio: float) -> str:
    return f"{ratio:.1f}x slower" if ratio >= 2 else f"{ratio - 1:.0%} slower"


def _main_difference(best: StepTime, alt: StepTime) -> str:
    a, b = alt.parts(), best.parts()
    name, delta = max(((k, a[k] - b.get(k, 0.0)) for k in a), key=lambda kv: kv[1])
    label = {"compute": "more compute on the slowest GPU", "tp_comm": "more TP communication",
             "ep_comm": "more expert all-to-all traffic", "cp_comm": "exposed ring-attention traffic",
             "pp_comm": "more pipeline p2p", "dp_comm": "exposed gradient synchronisation",
             "optimizer": "a larger optimizer step", "bubble": "a larger pipeline bubble"}[name]
    return f"{label}: +{seconds(delta)}"


# ---- --check parsing -----------------------------------------------------------------------------------
CHECK_KEYS = ("tp", "pp", "vpp", "ep", "etp", "cp", "dp", "first", "last")


def parse_check(text: str, gpus: int) -> Layout:
    """'tp=4,pp=4,ep=8' -> Layout; dp defaults to gpus / (tp * pp * cp)."""
    values: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in CHECK_KEYS:
            raise UserError(f"--check '{text}' is malformed: '{item}' is not one of "
                            f"{', '.join(k + '=N' for k in CHECK_KEYS)}; write e.g. --check tp=4,pp=4.")
        try:
            number = int(raw)
        except ValueError:
            raise UserError(f"--check '{text}' is malformed: {key} needs a positive integer, got '{raw}'.") from None
        if number < 1:
            raise UserError(f"--check '{text}' is malformed: {key} needs a positive integer, got {number}.")
        values[key] = number
    if not values:
        raise UserError("--check is empty; write e.g. --check tp=4,pp=4.")
    base = values.get("tp", 1) * values.get("pp", 1) * values.get("cp", 1)
    if "dp" not in values:
        if gpus % base:
            raise UserError(f"--check '{text}': tp x pp x cp = {base} does not divide the {gpus} GPUs.")
        values["dp"] = gpus // base
    return Layout(tp=values.get("tp", 1), pp=values.get("pp", 1), dp=values["dp"], vpp=values.get("vpp", 1),
                  ep=values.get("ep", 1), cp=values.get("cp", 1), etp=values.get("etp"),
                  first=values.get("first"), last=values.get("last"))
