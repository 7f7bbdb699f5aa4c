"""The one GPU table: what the planner plans for (`mzoo plan --gpu`) and what the trainer measures MFU
against, found from the device's name (`detect`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mzoo.errors import UserError


@dataclass(frozen=True)
class GPU:
    """One accelerator of a node. Bandwidths are per GPU and per direction, in GB/s (1e9 B/s)."""

    name: str
    memory_gib: float  # what the driver reports as total (nvidia-smi), in GiB
    bf16_tflops: float  # dense (no sparsity) tensor-core peak
    fp8_tflops: Optional[float]  # None: no FP8 tensor cores
    hbm_tbps: float  # memory bandwidth, TB/s
    nvlink_gbps: float  # NVLink inside a node (PCIe where there is none)
    network_gbps: float  # one NIC per GPU across nodes (InfiniBand / RoCE)
    source: str
    device_names: tuple[str, ...] = ()  # upper-case parts of torch.cuda.get_device_name() that mean this GPU

    @property
    def peak_tflops(self) -> float:
        """The bf16 peak in whole TFLOP/s, the figure the trainer's MFU is quoted against."""
        return float(round(self.bf16_tflops))


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100-80gb", 81559 / 1024, 989.4, 1978.9, 3.35, 450.0, 50.0,
        "NVIDIA H100 SXM5 datasheet (NVLink 4: 900 GB/s both ways); DGX H100: 8x ConnectX-7 400 Gb/s", ("H100",)),
    GPU("h200", 143771 / 1024, 989.4, 1978.9, 4.8, 450.0, 50.0,
        "NVIDIA H200 SXM datasheet (141 GB HBM3e, NVLink 900 GB/s); DGX H200: 8x ConnectX-7 400 Gb/s", ("H200",)),
    GPU("a100-80gb", 81920 / 1024, 312.0, None, 2.039, 300.0, 25.0,
        "NVIDIA A100 SXM4 80GB datasheet (NVLink 3: 600 GB/s both ways); DGX A100: 8x HDR 200 Gb/s", ("A100",)),
    GPU("b200", 183359 / 1024, 2250.0, 4500.0, 8.0, 900.0, 50.0,
        "NVIDIA HGX B200 datasheet (dense, per GPU; NVLink 5: 1.8 TB/s both ways); DGX B200: 8x ConnectX-7 400 Gb/s",
        ("B200",)),
    GPU("h100-pcie", 81559 / 1024, 756.0, 1513.0, 2.0, 300.0, 50.0,
        "NVIDIA H100 PCIe datasheet (NVLink bridge 600 GB/s both ways, pairs only); one 400 Gb/s NIC per GPU assumed",
        ("H100 PCIE",)),
    GPU("h100-nvl", 95830 / 1024, 835.0, 1670.5, 3.9, 300.0, 50.0,
        "NVIDIA H100 NVL datasheet (94 GB HBM3, NVLink bridge 600 GB/s both ways, pairs only); one 400 Gb/s NIC "
        "per GPU assumed", ("H100 NVL",)),
    GPU("l40s", 46068 / 1024, 362.0, 733.0, 0.864, 32.0, 25.0,
        "NVIDIA L40S datasheet (48 GB GDDR6, no NVLink: PCIe Gen4 x16); one 200 Gb/s NIC per GPU assumed", ("L40S",)),
    GPU("a10g", 23028 / 1024, 125.0, None, 0.6, 32.0, 12.5,
        "NVIDIA A10 datasheet (24 GB GDDR6, no NVLink: PCIe Gen4 x16); AWS g5: 100 Gb/s", ("A10G",)),
    GPU("l4", 23034 / 1024, 121.0, 242.5, 0.3, 32.0, 12.5,
        "NVIDIA L4 datasheet (24 GB GDDR6, no NVLink: PCIe Gen4 x16); one 100 Gb/s NIC per GPU assumed", ("L4",)),
    GPU("v100", 32768 / 1024, 125.0, None, 0.9, 150.0, 12.5,
        "NVIDIA V100 SXM2 32GB datasheet: no bf16 tensor cores, 125 is the fp16 tensor-core peak (NVLink 2: 300 GB/s "
        "both ways); DGX-1: 100 Gb/s EDR", ("V100",)),
    GPU("mi300x", 196592 / 1024, 1307.0, 2614.9, 5.3, 448.0, 50.0,
        "AMD Instinct MI300X datasheet (192 GB HBM3, Infinity Fabric 7 x 64 GB/s per direction); one 400 Gb/s NIC "
        "per GPU assumed", ("MI300X",)),
)}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise UserError(f"unknown GPU '{name}'; use one of {', '.join(GPUS)}.")
    return GPUS[name]


def match(device_name: str) -> Optional[GPU]:
    """The GPU whose longest device name is part of `device_name` (an H100 PCIe is not the SXM part, an L40S
    not an L4), or None."""
    name = device_name.upper()
    found = [(len(part), g) for g in GPUS.values() for part in g.device_names if part in name]
    return max(found, key=lambda lg: lg[0])[1] if found else None


def detect() -> Optional[GPU]:
    """This machine's GPU (the current CUDA device), or None on CPUs and unknown devices."""
    import torch

    return match(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
