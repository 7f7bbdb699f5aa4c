"""Seconds per step: model FLOPs at a share of peak, TP / EP / CP / PP / DP traffic at a share of link
bandwidth (what overlaps, docs/plan.md), the optimizer step and the pipeline bubble."""

from __future__ import annotations

from dataclasses import dataclass

from mzoo.config import ModelConfig
from mzoo.layout import Layout
from mzoo.plan.constants import COLLECTIVE_LATENCY_S, COMM_BYTES, FP8_EFFICIENCY, HBM_EFFICIENCY, LINK_EFFICIENCY
from mzoo.plan.costs import Model, Shard, Stage, as_model, end_params, kv_width, stages, vocab_rows
from mzoo.plan.hardware import GPU
from mzoo.plan.profile import Profile, sequence_parallel
from mzoo.plan.settings import Settings, recomputed_modules


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
    model = as_model(cfg)
    times = [_stage_time(model, layout, settings, g, profile, s) for s in stages(model.cfg, layout)]
    slowest = max(range(len(times)), key=lambda i: times[i].per_microbatch)
    s = times[slowest]
    m = settings.microbatches(layout)
    slots = (m * layout.vpp + layout.pp - 1) / layout.vpp
    tail = max(t.dp + t.optimizer for t in times)
    step = slots * s.per_microbatch + tail
    bubble = (layout.pp - 1) / (m * layout.vpp + layout.pp - 1)
    tokens = settings.global_batch * settings.seq_len
    mfu = model.model_flops(settings.seq_len) * tokens / (layout.world_size * g.bf16_tflops * 1e12 * step)
    dp = max(t.dp for t in times)
    return StepTime(s.compute, s.tp, s.ep, s.cp, s.pp, m, bubble, dp, tail - dp, step, mfu, tokens / step, slowest)


def _stage_time(model: Model, layout: Layout, settings: Settings, g: GPU, profile: Profile, stage: Stage) -> _StageTime:
    cfg = model.cfg
    T, t, gpn = settings.tokens(layout), layout.tp, settings.gpus_per_node
    rate_gemm = (g.fp8_tflops * FP8_EFFICIENCY if settings.fp8 else g.bf16_tflops * profile.efficiency) * 1e12
    rate_core = g.bf16_tflops * profile.efficiency * 1e12
    sh = 1.0 / t if sequence_parallel(profile, t) else 1.0
    selective, modules = settings.recompute == "selective", recomputed_modules(profile, settings)
    full = 0.0  # the share of layers recomputed whole
    if settings.recompute == "full":
        layers = max(1, stage.num_layers)
        full = 1.0 if settings.recompute_layers is None else min(1.0, settings.recompute_layers * stage.chunks / layers)
    gemm = core = extra = tp_elems = tp_calls = ep = cp_exposed = 0.0
    for blocks, n in model.kinds(stage.ranges):
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
            if block in ("gqa", "mla") and layout.cp > 1 and profile.engine:
                # mzoo: all-gather K, V forward (again when recomputed), reduce-scatter their grads; not overlapped
                kv = T * kv_width(cfg) / t * COMM_BYTES
                cp_exposed += n * (2 + full) * (layout.cp - 1) * kv / _bandwidth(g, t * layout.cp, gpn)
            elif block in ("gqa", "mla") and layout.cp > 1:
                kv = T * kv_width(cfg) / t * COMM_BYTES
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
    fit is exposed; mzoo's engine does the same with --overlap-grad-reduce / --overlap-param-gather
    (`Profile.overlap_dp`)."""
    shard = Shard(layout.tp, layout.expert_tp, layout.ep, False)
    params = model.params(stage.ranges, shard) + end_params(model.cfg, stage, vocab_rows(model.cfg, layout.tp))
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
    else:  # without overlap: reduced after the whole backward, gathered in the step: all exposed
        exposed = reduce + gather
    per_element = profile.grad + 2 * (profile.master + profile.moments) + profile.param
    return exposed, elements * per_element / (g.hbm_tbps * 1e12 * HBM_EFFICIENCY)
