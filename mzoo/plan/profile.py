"""How a framework stores a model: bytes per parameter and per saved activation, and what it recomputes
(Megatron-Core + Transformer Engine, or mzoo's own engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mzoo.plan.constants import ENGINE_EFFICIENCY, GEMM_EFFICIENCY, GIB, MEGATRON_OVERHEAD_GIB


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


def engine_profile(precision: str = "fp32", sequence_parallel: bool = False, device: str = "cpu",
                   overlap: bool = False) -> Profile:
    """mzoo's own engine (mzoo/parallel/optimizer.py): parameters in the training dtype, the fp32
    main-gradient buffer, fp32 master + Adam m, v (sharded by the distributed optimizer), the same
    2 + 4 + 12/dp bytes as Megatron for bf16. The loss keeps the logits in their dtype and writes
    their gradient in place. On a GPU the runtime's fixed memory (CUDA context, NCCL, cuBLAS) is
    Megatron's; on the CPU it is part of the measured baseline, and gloo's DP collectives copy one
    fp32 bucket during the optimizer step (NCCL reduces the buffer in place). `overlap`: the run
    overlaps its DP traffic (--overlap-grad-reduce with --overlap-param-gather when distributed)."""
    size = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    overhead = int(MEGATRON_OVERHEAD_GIB * GIB) if device == "cuda" else 0
    return Profile(f"mzoo-{precision}", param=size, grad=4, master=4, moments=8, act=size, logits=size,
                   sequence_parallel=sequence_parallel, engine=True, selective=frozenset({"core_attn"}),
                   overhead=overhead, bucket_copy=device != "cuda", efficiency=ENGINE_EFFICIENCY, overlap_dp=overlap)


def sequence_parallel(profile: Profile, tp: int) -> bool:
    """Whether activations are split over the sequence at this TP size."""
    return tp > 1 if profile.sequence_parallel is None else (profile.sequence_parallel and tp > 1)
