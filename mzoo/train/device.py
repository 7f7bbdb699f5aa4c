"""Where a rank runs: its device, its process group, and the precision defaults that go with it.

Each rank owns the GPU of its LOCAL_RANK (Megatron and torchtitan set it before the process group,
so that NCCL communicators, RNG states and `current_device()` all agree). The process group has a
gloo backend beside NCCL, so that object collectives (checkpoint gathers, barriers) run on the CPU
and tensors are routed by their device. CPU with gloo stays the exact reference the tests use.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mzoo.errors import UserError

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: this rank's GPU when torch sees one, else the CPU; `cuda` without one is one sentence."""
    if device_type(name) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device cuda was asked for, but this torch ({torch.__version__}) sees no CUDA device; "
                        "install a CUDA build of torch on a GPU machine, or use --device cpu.")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; start at most "
                        "that many processes per node (--nproc-per-node).")
    return torch.device("cuda", local)


def device_type(name: str = "auto") -> str:
    """The device kind a run would use, without requiring it to be present (for --dry-run)."""
    if name not in DEVICES:
        raise UserError(f"unknown --device '{name}'; use auto, cuda or cpu.")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def default_precision(device: torch.device | str) -> str:
    """bf16 on GPUs (fp32 master weights and main gradients); fp32 on CPUs, the exact reference."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def init_process_group(device: torch.device) -> bool:
    """Join the launcher's process group on `device`; True when this call created it. On GPUs the
    device is set first and bound to the group (NCCL for CUDA tensors, gloo for CPU ones)."""
    from mzoo.train.run import in_launcher

    if dist.is_initialized() or not in_launcher():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def configure(device: torch.device) -> None:
    """Per-process settings for the device: TF32 for fp32 matmuls and convolutions on GPUs (bf16 runs
    are unaffected; the CPU reference has no TF32)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
