"""Test-only shim that lets the REAL megatron-core 0.16.1 run on a CPU-only torch.

megatron-core is written for GPUs: even with `use_cpu_initialization=True` its RNG tracker,
a few tensor allocations and the checkpoint writers call `torch.cuda.*`, which raise
"Torch not compiled with CUDA enabled" on a CPU build. `install_cpu_shim()` maps exactly
those calls to CPU equivalents. Nothing of megatron's modelling or checkpointing logic is
replaced: the layers, the sharded state dicts and `dist_checkpointing` are the real code.

Every patch below says which megatron-core call site needs it. The shim is idempotent and
is a no-op on a machine where CUDA is available (there megatron runs unmodified).
"""

from __future__ import annotations

import torch

_INSTALLED = False


def _cpu_get_rng_state(device="cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed) -> None:
    # The "device" generator of this shim is the CPU default generator; megatron seeds it
    # right after saving its state and restores it afterwards (CudaRNGStatesTracker.add).
    # Seed the generator directly: torch.manual_seed would call torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def install_cpu_shim() -> None:
    """Patch the handful of torch.cuda entry points megatron-core 0.16.1 uses on CPU.

    Covers: GPTModel construction with the local spec, forward/backward at TP = 1 and 2 over
    gloo, `model_parallel_cuda_manual_seed`, and `dist_checkpointing.save/load` with the
    torch_dist backend (including its spawned writer processes, which re-import this
    module only if the launched function calls install_cpu_shim() itself)."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        _INSTALLED = True
        return

    cuda = torch.cuda
    # Device handle used as `device=torch.cuda.current_device()` when megatron allocates
    # buffers (rotary inv_freq, attention masks, TP gather buffers in tensor_parallel.layers,
    # the ints all-reduced by dist_checkpointing's state_dict_saver/async_utils).
    cuda.current_device = lambda: "cpu"
    # CudaRNGStatesTracker.add() saves, seeds and restores the "cuda" generator;
    # model_parallel_cuda_manual_seed seeds it. Map them to the CPU default generator.
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state
    # (torch.cuda.manual_seed_all is left alone: megatron does not call it, and torch.manual_seed
    # calls it lazily, which is already harmless on a CPU build.)
    cuda.manual_seed = _cpu_manual_seed
    cuda.random.manual_seed = _cpu_manual_seed
    # dist_checkpointing (fully_parallel, filesystem_async, async_utils, tensor_aware_state_dict)
    # synchronises the device before and after writing: nothing to wait for on CPU.
    cuda.synchronize = lambda *args, **kwargs: None

    # tensor_parallel.random keeps private copies of the cuda rng getter/setter and calls them
    # from CudaRNGStatesTracker.fork() (every embedding dropout / attention dropout / init).
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state

    # MoE without Transformer Engine: 0.16.1 references te_general_gemm unconditionally in
    # moe_utils when it was imported as a placeholder; None makes it take the torch path.
    try:
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = None
    except ImportError:  # pragma: no cover - MoE module missing in another version
        pass

    _INSTALLED = True
