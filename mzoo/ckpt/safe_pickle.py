"""Loading pickles without running arbitrary code.

Megatron checkpoints are pickles (legacy rank files, common.pt, DCP's .metadata). mzoo loads them
with torch's weights_only unpickler (or a restricted pickle.Unpickler for DCP metadata) and an
explicit allowlist of what such files contain. Anything else needs `--trust-pickle`.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from mzoo.ckpt.hf import CheckpointError


class PickledEnum:
    """Stand-in for Megatron enums in `args` (AttnBackend, ModelType, ...): keeps the value
    without importing megatron."""

    def __init__(self, value: Any = None):
        self.value = value

    def __repr__(self) -> str:
        return f"<enum {self.value!r}>"


_MEGATRON_ENUMS = [
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.enums.ModelType",
    "megatron.core.enums.Fp8Recipe",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.optimizer.cpu_offloading.hybrid_optimizer.HybridDeviceOptimizer",
]


def _numpy_globals() -> list[Any]:
    """What Megatron's `rng_state` (numpy RandomState tuples) needs."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore
    out = [_reconstruct, np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("uint32", "float64", "int64", "float32", "uint8")]
    out += [(_reconstruct, "numpy.core.multiarray._reconstruct")]
    return out


def allowlist() -> list[Any]:
    return [argparse.Namespace, collections.OrderedDict, PickledEnum, io.BytesIO] + _numpy_globals() + [
        (PickledEnum, name) for name in _MEGATRON_ENUMS
    ]


def torch_load(path: str | Path | io.BytesIO, trust_pickle: bool = False, mmap: bool = False) -> Any:
    """torch.load with weights_only and mzoo's allowlist; `trust_pickle` lifts the restriction."""
    where = path if isinstance(path, (str, Path)) else "a pickled object"
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(allowlist()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if "PytorchStreamReader" in str(e) or "zip archive" in str(e) or "file" in str(e).lower():
            raise CheckpointError(f"{where} is not a readable torch file (truncated or corrupt); re-copy it.") from None
        raise
    except (EOFError, ValueError) as e:
        raise CheckpointError(f"{where} is not a readable torch file ({e.__class__.__name__}); re-copy it.") from None
    except pickle.UnpicklingError as e:
        culprit = str(e).split("GLOBAL ")[-1].split(" ")[0] if "GLOBAL" in str(e) else "an object"
        raise CheckpointError(
            f"{where} contains {culprit}, which mzoo does not unpickle by default; "
            "pass --trust-pickle if you trust this file."
        ) from None


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {("torch", "Size"), ("collections", "OrderedDict"), ("torch", "device"), ("builtins", "set"),
                ("builtins", "frozenset"), ("torch._utils", "_rebuild_tensor_v2"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}


class _DCPUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = module in _DCP_MODULES or (module, name) in _DCP_GLOBALS
        value = getattr(torch, name, None) if module == "torch" else None
        if module == "torch" and isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            allowed = True
        if module == "torch" and name.endswith("Storage"):
            allowed = True
        if not allowed:
            raise CheckpointError(
                f"DCP metadata contains {module}.{name}, which mzoo does not unpickle by default; "
                "pass --trust-pickle if you trust this checkpoint."
            )
        return super().find_class(module, name)


def load_dcp_metadata(path: Path, trust_pickle: bool = False) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f) if trust_pickle else _DCPUnpickler(f).load()
