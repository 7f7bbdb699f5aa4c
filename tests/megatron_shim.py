"""Test-only shim that lets the REAL megatron-core 0.16.1 run on a CPU-only torch build.

megatron-core is written for GPUs: even with `use_cpu_initialization=True` its RNG tracker, a few
buffer allocations and the checkpoint writers call `torch.cuda.*`, which raise "Torch not compiled
with CUDA enabled" on a CPU build. `install_cpu_shim()` maps exactly those calls to CPU
equivalents. Nothing of megatron's modelling or checkpointing code is replaced: the layers, the
sharded state dicts and `dist_checkpointing` are the real thing.

Measured on megatron-core 0.16.1 / torch 2.13 CPU (GPTModel local spec, TP=2 over gloo, forward,
torch_dist save and load), removing one patch at a time:
- current_device      REQUIRED: forward fails (rotary inv_freq / TP gather buffers).
- get/set_rng_state   REQUIRED: GPTModel construction fails (model_parallel_cuda_manual_seed).
- synchronize         REQUIRED: dist_checkpointing.save fails.
- manual_seed         not required to run (torch.cuda.manual_seed is lazy, a silent no-op on a
                      CPU build) but without it megatron's seed never reaches any generator; with
                      it the seed given to model_parallel_cuda_manual_seed seeds the CPU generator,
                      so CPU-initialised models are reproducible (same global weights at any TP).
- tensor_parallel.random._get/_set_cuda_rng_state
                      not required to run, but the originals are wrong on CPU: the setter defers
                      its work with torch.cuda._lazy_call, which never runs, so
                      CudaRNGStatesTracker.fork() would silently not switch RNG states.
- torch.cuda.is_available is deliberately NOT patched: it must stay False so that megatron takes
  its CPU/no-TE code paths (e.g. dist_checkpointing.strategies.torch skips TE's Float8Tensor).
  torch.cuda.manual_seed_all is not patched either: megatron does not call it, and torch.manual_seed
  calls it lazily, which is harmless on a CPU build.

The shim is idempotent and a no-op where CUDA is available (megatron then runs unmodified).
Processes started with `spawn` (tests/dist.py ranks) must call it themselves; the writer
processes dist_checkpointing.save starts only write files and need no CUDA.
"""

from __future__ import annotations

import torch

_INSTALLED = False


def _cpu_get_rng_state(device="cuda", *args, **kwargs) -> torch.Tensor:
    """Stands in for torch.cuda.get_rng_state and tensor_parallel.random._get_cuda_rng_state
    (whose extra arguments clone/graph_safe only matter for CUDA graphs)."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, *args, **kwargs) -> None:
    """Stands in for torch.cuda.set_rng_state and tensor_parallel.random._set_cuda_rng_state."""
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed) -> None:
    """Stands in for torch.cuda.manual_seed: the shim's "device" generator is the CPU default
    generator. Seeds it directly (torch.manual_seed would also call torch.cuda.manual_seed_all)."""
    torch.default_generator.manual_seed(int(seed))


def install_cpu_shim() -> None:
    """Patch the torch.cuda entry points megatron-core 0.16.1 uses on CPU (see module docstring).

    Covers GPTModel construction with the local spec, forward/backward at TP = 1 and 2 over gloo,
    model_parallel_cuda_manual_seed / the RNG tracker, and dist_checkpointing save/load with the
    torch_dist backend."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        _INSTALLED = True
        return

    cuda = torch.cuda
    # `device=torch.cuda.current_device()` where megatron allocates: rotary inv_freq (get_emb),
    # attention/TP gather buffers (tensor_parallel.layers, transformer.attention), the small int
    # tensors dist_checkpointing all-reduces (state_dict_saver, async_utils).
    cuda.current_device = lambda: "cpu"
    # CudaRNGStatesTracker.add() saves the "cuda" generator state, seeds it, stores the new state
    # and restores the old one; model_parallel_cuda_manual_seed seeds it. Map all of that to the
    # CPU default generator.
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.random.manual_seed = _cpu_manual_seed
    # dist_checkpointing (filesystem_async, fully_parallel, async_utils, tensor_aware_state_dict)
    # synchronises the device around writing: there is nothing to wait for on CPU.
    cuda.synchronize = lambda *args, **kwargs: None

    # tensor_parallel.random keeps private getter/setter functions that CudaRNGStatesTracker.fork()
    # and the activation-checkpoint RNG helpers call; the originals defer to CUDA lazily.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state

    # MoE without Transformer Engine: moe_utils imports te_general_gemm only inside its
    # `try: import transformer_engine` block, yet the router GEMM tests `te_general_gemm is not
    # None` unconditionally -> NameError. Defining it as None selects the torch.mm path.
    try:
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
    except ImportError:  # pragma: no cover - other megatron-core versions
        pass
    # Sliding-window attention (GPT-OSS) without TE: fused_softmax's torch path builds the window mask
    # with get_sliding_window_causal_mask, which allocates it on device="cuda". The same triu/tril
    # on the CPU; nothing else of the softmax changes.
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    _INSTALLED = True


def _cpu_sliding_window_causal_mask(sq, skv, window_size):
    """megatron.core.transformer.utils.get_sliding_window_causal_mask (0.16.1), allocated on the CPU."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])
