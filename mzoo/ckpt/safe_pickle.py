"""Loading pickles without running arbitrary code.

Megatron checkpoints are pickles (legacy rank files, common.pt, DCP's .metadata). mzoo loads them
with torch's weights_only unpickler (or a restricted pickle.Unpickler for DCP metadata) and an
explicit allowlist of what such files contain. Anything else needs `--trust-pickle`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import importlib
import io
import pickle
import re
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from mzoo.ckpt.dcp_meta import MIRRORS
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


@contextmanager
def _only(allowed: list) -> Iterator[None]:
    """Exactly `allowed` while loading, and the process's own list back after: torch's safe_globals
    context manager leaves the list empty on exit, silently unregistering what other libraries
    (megatron-core registers argparse.Namespace at import) rely on."""
    prior = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(prior)


def torch_load(path: str | Path | io.BytesIO, trust_pickle: bool = False, mmap: bool = False) -> Any:
    """torch.load with weights_only and mzoo's allowlist; `trust_pickle` lifts the restriction.

    Whatever is wrong with the file, the error is one sentence: a disallowed object names the
    global and points at --trust-pickle; anything else (truncation, corrupt bytes) says the file is
    not readable."""
    where = path if isinstance(path, (str, Path)) else "a pickled object"
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with _only(allowlist()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal(where, str(e))) from None
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist; the checkpoint is incomplete.") from None
    except PermissionError:
        raise CheckpointError(f"{where} cannot be read (permission denied); fix its permissions.") from None
    except Exception as e:  # noqa: BLE001 - torch's zip reader and unpickler raise many kinds on a corrupt file
        raise CheckpointError(
            f"{where} is not a readable torch file (truncated or corrupt: {_reason(e)}); re-copy it."
        ) from None


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
    return e.__class__.__name__ + (f": {_printable(first, 100)}" if first else "")


def _printable(text: str, limit: int = 120) -> str:
    """A name taken from a (possibly corrupt) file, safe to put in a one-line message."""
    clean = re.sub(r"[^\w.<>:'\- ]", "?", text.strip())
    return clean[:limit] + ("..." if len(clean) > limit else "")


_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_DISALLOWED_OBJECT = re.compile(r"(Trying to call reduce for unrecognized function .*|Can only build .*|"
                                r"Can only create new object .*|Trying to instantiate unsupported class .*)")


def _refusal(where: Any, message: str) -> str:
    """The one sentence for torch's weights-only UnpicklingError `message`."""
    inner = message.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if message.strip() else ""
    trust = "pass --trust-pickle if you trust this file"
    found = _GLOBAL.search(message)
    if found:
        return f"{where} contains {_printable(found.group(1))}, which mzoo does not unpickle by default; {trust}."
    if _DISALLOWED_OBJECT.match(inner):
        return f"{where} contains an object mzoo does not unpickle by default ({_printable(inner)}); {trust}."
    if inner.startswith("Unsupported operand"):
        return (f"{where} holds pickle data the safe loader cannot read (a newer pickle protocol, or a corrupt "
                f"file); {trust}, otherwise re-copy it.")
    return f"{where} is not a readable torch file (corrupt pickle data); re-copy it."


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_DCP_GLOBALS = {("torch", "Size"), ("collections", "OrderedDict"), ("torch", "device"), ("builtins", "set"),
                ("builtins", "frozenset"), ("torch._utils", "_rebuild_tensor_v2"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}


def _dcp_class(value: Any, module: str) -> bool:
    """Metadata types DCP pickles: dataclasses and enums defined in its own modules (not their
    functions, not the writer/reader classes, not names those modules import)."""
    return (isinstance(value, type) and value.__module__ == module
            and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)))


class _MirroringUnpickler(pickle.Unpickler):
    """DCP's metadata classes become mzoo's mirrors (no DCP import); anything else as pickle does
    (used with --trust-pickle)."""

    def find_class(self, module: str, name: str) -> Any:
        mirror = MIRRORS.get((module, name))
        return mirror if mirror is not None else super().find_class(module, name)


class _DCPUnpickler(_MirroringUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in MIRRORS:
            return MIRRORS[(module, name)]
        allowed = (module, name) in _DCP_GLOBALS
        if not allowed and "." not in name:  # a dotted name would walk out of the module (protocol 4)
            if module in _DCP_MODULES:
                allowed = _dcp_class(getattr(importlib.import_module(module), name, None), module)
            elif module == "torch":
                value = getattr(torch, name, None)
                allowed = isinstance(value, (torch.dtype, torch.memory_format, torch.layout)) or (
                    isinstance(value, type) and name.endswith("Storage"))
        if not allowed:
            raise CheckpointError(
                f"DCP metadata contains {_printable(module)}.{_printable(name)}, which mzoo does not unpickle by "
                "default; pass --trust-pickle if you trust this checkpoint."
            )
        return super().find_class(module, name)


def load_dcp_metadata(path: Path, trust_pickle: bool = False) -> Any:
    with open(path, "rb") as f:
        if trust_pickle:
            return _MirroringUnpickler(f).load()
        try:
            return _DCPUnpickler(f).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt pickle raises many kinds
            raise CheckpointError(f"{path} is not readable DCP metadata (truncated or corrupt: {_reason(e)}); "
                                  "re-copy it.") from None
