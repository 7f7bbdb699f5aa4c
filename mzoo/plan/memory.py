"""Bytes on one GPU: weights, gradients and optimizer states as a profile stores them, saved activations
times the micro-batches in flight, the loss's logits, communication buffers and the runtime's overhead."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mzoo.config import ModelConfig
from mzoo.layout import Layout
from mzoo.parallel.blockwise import DEFAULT_TILE as CP_TILE
from mzoo.parallel.cross_entropy import CHUNK_ELEMENTS as CE_CHUNK_ELEMENTS
from mzoo.plan.constants import DDP_BUCKET_ELEMENTS, FP8_WEIGHT_BYTES, GIB
from mzoo.plan.costs import (
    BlockParams, Model, Shard, Stage, as_model, block_activations, end_params, kv_width, lora_params, norm_activations,
    stages, vocab_rows,
)
from mzoo.plan.profile import Profile, sequence_parallel
from mzoo.plan.settings import Settings, recomputed_modules


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

def _stage_activations(model: Model, stage: Stage, shard: Shard, profile: Profile,
                       settings: Settings) -> tuple[float, float]:
    """(bytes per token of one micro-batch over the stage's layers, extra working bytes per token
    held once: the layer or block being recomputed)."""
    modules = recomputed_modules(profile, settings)
    kinds = model.kinds(stage.ranges)
    per_kind = [(model.layer_activations(blocks, shard, profile, modules), n) for blocks, n in kinds]
    if settings.recompute != "full":
        working = 0.0
        if modules & {"mlp", "moe"}:  # the recomputed block's activations, one at a time in backward
            working = max((block_activations(model.cfg, b, shard, profile, frozenset())
                           for blocks, _ in kinds for b in blocks if b in modules), default=0.0)
        return sum(a * n for a, n in per_kind), working
    kept = profile.act * model.cfg.hidden_size * (1.0 / shard.tp if shard.sp else 1.0)  # each layer's input
    layers = stage.num_layers
    recomputed = layers if settings.recompute_layers is None else min(layers, settings.recompute_layers * stage.chunks)
    whole = sum(a * n for a, n in per_kind) / max(1, layers)  # the rest keep everything (average layer)
    # working: one layer recomputed in backward, beside the gradients of its output and of its input
    working = max((a for a, _ in per_kind), default=0.0) + 2 * kept
    return kept * recomputed + whole * (layers - recomputed), working


def _gathered_kv(model: Model, layout: Layout, stage: Stage, profile: Profile, settings: Settings
                 ) -> tuple[float, float]:
    """(saved, working) bytes per local token that mzoo's context-parallel attention adds: each attention
    layer keeps the keys and values all-gathered from the other cp - 1 ranks for its backward (none
    while recomputed, then one layer's worth at a time). Megatron's ring keeps only its chunks in
    flight (a buffer, `_buffers`)."""
    if layout.cp == 1 or not profile.engine:
        return 0.0, 0.0
    per_layer = profile.act * (layout.cp - 1) * kv_width(model.cfg) / layout.tp
    kinds = model.kinds(stage.ranges)
    attention = sum(n for blocks, n in kinds if {"gqa", "mla"} & set(blocks))
    if not attention:
        return 0.0, 0.0
    if "core_attn" in recomputed_modules(profile, settings):
        return 0.0, per_layer
    kept = attention
    if settings.recompute == "full":
        layers = stage.num_layers
        recomputed = layers if settings.recompute_layers is None else min(layers, settings.recompute_layers * stage.chunks)
        kept = attention * (layers - recomputed) / max(1, layers)
    return per_layer * kept, per_layer if kept < attention else 0.0


def _eager_scores(model: Model, layout: Layout, stage: Stage, profile: Profile, settings: Settings
                  ) -> tuple[float, float]:
    """(saved, working) bytes per local token of mzoo's eager sink / sliding-window attention
    (models/attention.py, GPT-OSS without CP): each attention layer keeps its softmax output
    [heads / tp, s, s + 1] and its [s, s] bool mask for backward (none while recomputed, then one
    layer's worth); its keys and values repeated per query head take the place of what SDPA keeps
    (measured: tests/mzoo/test_plan.py). The working peak adds one layer's scores and masked scores.
    Megatron's fused kernels (and CP's tiles) keep no [s, s] tensor."""
    cfg = model.cfg
    if not profile.engine or layout.cp > 1 or (cfg.softmax_type == "vanilla" and cfg.window_size is None):
        return 0.0, 0.0
    heads, seq, e = cfg.num_attention_heads / layout.tp, settings.seq_len, profile.act
    per_layer = e * heads * (seq + 1) + seq / settings.micro_batch  # + the bool mask
    working = 2 * e * heads * seq
    attention = sum(n for blocks, n in model.kinds(stage.ranges) if "gqa" in blocks)
    if not attention:
        return 0.0, 0.0
    if "core_attn" in recomputed_modules(profile, settings):
        return 0.0, per_layer + working
    kept = attention
    if settings.recompute == "full":
        layers = stage.num_layers
        recomputed = layers if settings.recompute_layers is None else min(layers, settings.recompute_layers * stage.chunks)
        kept = attention * (layers - recomputed) / max(1, layers)
    return per_layer * kept, working + (per_layer if kept < attention else 0.0)


def _attention_tile(cfg: ModelConfig, layout: Layout, settings: Settings, profile: Profile) -> float:
    """Bytes alive inside one tiled (CP) attention of mzoo's engine: one fp32 tile of scores,
    probabilities and their gradients; never at the same time as the loss's logits."""
    if layout.cp == 1 or not profile.engine:
        return 0.0
    rows, cols = min(CP_TILE, settings.seq_len // layout.cp), min(CP_TILE, settings.seq_len)
    return 4 * 4 * settings.micro_batch * cfg.num_attention_heads / layout.tp * rows * cols


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
    model = as_model(cfg)
    cfg = model.cfg
    sp = sequence_parallel(profile, layout.tp)
    shard = Shard(layout.tp, layout.expert_tp, layout.ep, sp)
    params = model.params(stage.ranges, replace(shard, sp=False)) + end_params(cfg, stage, vocab_rows(cfg, layout.tp))
    dense_shards = layout.dp * layout.cp if settings.distributed_optimizer else 1
    expert_shards = layout.expert_dp if settings.distributed_optimizer else 1
    trained = params.dense + params.expert
    opt_elements = params.dense / dense_shards + params.expert / expert_shards
    weights = trained * (profile.param + (FP8_WEIGHT_BYTES if profile.fp8 else 0)) + params.frozen * 4
    if settings.lora_rank:  # LoRA: the base frozen in its dtype; gradients and states for the adapters only
        trained = lora_params(cfg, model.kinds(stage.ranges), layout.tp, settings.lora_rank, settings.lora_parts)
        weights += trained * profile.param
        opt_elements = trained / dense_shards
    gradients = trained * profile.grad
    optimizer = opt_elements * (profile.master + profile.moments)

    T = settings.tokens(layout)
    m = settings.microbatches(layout)
    per_token, working = _stage_activations(model, stage, shard, profile, settings)
    kept_kv, kv_working = _gathered_kv(model, layout, stage, profile, settings)
    kept_scores, scores_working = _eager_scores(model, layout, stage, profile, settings)
    per_token, working = per_token + kept_kv + kept_scores, working + kv_working + scores_working
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
        biggest = trained if settings.lora_rank else max(params.dense, params.expert)
        step = 4 * min(DDP_BUCKET_ELEMENTS, biggest)  # gloo's copy of one fp32 bucket
    working = T * working + _attention_tile(cfg, layout, settings, profile)
    return Memory(weights, gradients, optimizer, activations, working, logits, buffers,
                  step, profile.overhead, stage.rank, params.total)


def _buffers(model: Model, layout: Layout, settings: Settings, profile: Profile, stage: Stage,
             params: BlockParams, T: int, sp: bool, m: int) -> float:
    """Communication buffers alive during forward/backward (docs/plan.md)."""
    cfg = model.cfg
    h, e = cfg.hidden_size, profile.act
    sh = 1.0 / layout.tp if sp else 1.0
    blocks = {b for kind, _ in model.kinds(stage.ranges) for b in kind}
    out = 0.0
    if sp and not profile.engine:  # the all-gathered input of the linear being computed
        out += T * h * e
    if layout.ep > 1 and "moe" in blocks:  # all-to-all send + receive
        out += 2 * cfg.moe.top_k * T * sh * h * e
    if layout.cp > 1 and not profile.engine:  # ring attention: K/V chunks in flight (double buffered)
        out += 2 * T * kv_width(cfg) / layout.tp * e
    if layout.pp > 1:  # p2p send + receive of one micro-batch's hidden state
        out += 2 * T * h * sh * e
    shards = layout.dp * layout.cp
    if settings.distributed_optimizer and shards > 1 and not profile.engine:  # param all-gather bucket
        out += min(max(DDP_BUCKET_ELEMENTS, 1_000_000 * shards), params.dense + params.expert) * profile.param
    if profile.engine and not settings.lora_rank:  # autograd's .grad of one parameter, until the hook adds it
        # to the main grad (a LoRA run's are the adapters': a rank-r sliver)
        out += _largest_param(cfg, layout, stage, blocks) * profile.param
    return out


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
    model = as_model(cfg)
    return max((stage_memory(model, layout, settings, profile, s) for s in stages(model.cfg, layout)),
               key=lambda mm: mm.total)
