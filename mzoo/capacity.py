"""What this machine can hold, and the one refusal when a job would allocate more.

Sizes in a config (hidden_size, ffn_hidden_size, vocab_size, num_layers) decide how much a job that
builds a model allocates; a config.json claiming a hidden size of 4M would otherwise run into a
MemoryError, or swap the machine, minutes later. Every job that builds a model (generate, verify, the
fit check of train and finetune, init's largest tensor) asks `require_memory` first. The capacity is
what the driver reports free on a GPU, less the planner's headroom, or the host's available memory.
Kept free of torch at import: the CLI imports it before a command's job.
"""

from __future__ import annotations

import os
from typing import Any

from mzoo.errors import UserError
from mzoo.plan.constants import GIB, HEADROOM  # the planner's share of a GPU kept free for the allocator


class MemoryNeedError(UserError):
    """A job would allocate more than the machine offers: checked before anything is allocated."""


def bytes_text(n: float) -> str:
    """1.5 GiB, 120.0 TiB, 512 B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def host_available() -> float:
    """MemAvailable from /proc/meminfo (the kernel's estimate of what can be allocated without
    swapping), else the physical memory."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def capacity(device: Any, local_processes: int = 1) -> tuple[float, str]:
    """(bytes one process may use on `device`, a phrase naming where)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free * (1 - HEADROOM), f"GPU {device} ({free / GIB:.1f} GiB free, less {HEADROOM:.0%} headroom)"
    total = host_available()
    if local_processes > 1:
        return total / local_processes, f"this machine ({total / GIB:.1f} GiB available, {local_processes} processes)"
    return total, "this machine"


def require_memory(need_bytes: float, device: Any, what: str,
                   fix: str = "check the config's sizes or run on a machine with more memory") -> None:
    """Refuse in one sentence, before anything is allocated, when `what` needs more than `device` offers."""
    available, where = capacity(device)
    if need_bytes > available:
        raise MemoryNeedError(f"{what} needs about {bytes_text(need_bytes)} of memory but {where} offers "
                              f"{bytes_text(available)}; {fix}.")
