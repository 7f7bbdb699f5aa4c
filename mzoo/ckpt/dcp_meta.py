"""DCP's metadata classes, mirrored: `.metadata` is written and read without importing
`torch.distributed.checkpoint`, whose import costs 1.1 s here (it pulls in DTensor and sympy): as much
as converting a gigabyte.

The mirrors have DCP's field names, defaults and pickled state, and pickle under DCP's own module and
class names, so the bytes are what DCP writes (checked against DCP in tests) and DCP, megatron-core and
mzoo read them alike. Reading maps DCP's names to these classes; a DCP name not mirrored here (a newer
torch's addition) is resolved from DCP itself, as before.
"""

from __future__ import annotations

import enum
import io
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


@dataclass
class ChunkStorageMetadata:
    offsets: torch.Size
    sizes: torch.Size


class _MEM_FORMAT_ENCODING(enum.Enum):  # noqa: N801 - DCP's name
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


_FORMATS = {torch.contiguous_format: _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT,
            torch.channels_last: _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST,
            torch.preserve_format: _MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT}
_DECODE = {encoding: fmt for fmt, encoding in _FORMATS.items()}


@dataclass
class TensorProperties:
    dtype: torch.dtype = field(default_factory=torch.get_default_dtype)
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False

    def __getstate__(self):  # DCP's: torch.memory_format does not pickle
        return (self.dtype, self.layout, self.requires_grad, _FORMATS[self.memory_format], self.pin_memory)

    def __setstate__(self, state) -> None:
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        self.memory_format = _DECODE[_MEM_FORMAT_ENCODING(encoding)]


@dataclass
class TensorStorageMetadata:
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    pass


@dataclass
class StorageMeta:
    checkpoint_id: Any = None
    save_id: Optional[str] = None
    load_id: Optional[str] = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    state_dict_metadata: dict[str, Any]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: Optional[StorageMeta] = None
    version: Optional[str] = None


@dataclass(frozen=True)
class MetadataIndex:
    fqn: str
    offset: Optional[torch.Size] = None
    index: Optional[int] = field(hash=False, compare=False, default=None)

    def __init__(self, fqn: str, offset: Optional[tuple[int, ...]] = None, index: Optional[int] = None):
        # DCP's __dict__ has no offset when it is None (the class default stands in)
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "index", index)
        if offset is not None:
            object.__setattr__(self, "offset", torch.Size(offset))


@dataclass
class _StorageInfo:
    relative_path: str
    offset: int
    length: int
    transform_descriptors: Optional[list[str]] = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if v is not None}


_NAMES: dict[type, tuple[str, str]] = {
    **{cls: (_METADATA, cls.__name__) for cls in (ChunkStorageMetadata, _MEM_FORMAT_ENCODING, TensorProperties,
                                                  TensorStorageMetadata, BytesStorageMetadata, StorageMeta, Metadata,
                                                  MetadataIndex)},
    _StorageInfo: (_FILESYSTEM, "_StorageInfo"),
}
MIRRORS: dict[tuple[str, str], type] = {name: cls for cls, name in _NAMES.items()}


class _Pickler(pickle._Pickler):  # the Python pickler: the C one cannot rename classes
    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        target = _NAMES.get(obj) if isinstance(obj, type) else None
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dumps(metadata: Metadata) -> bytes:
    """The `.metadata` bytes DCP writes for `metadata` (protocol 4, as DCP's pickle.dump)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=4).dump(metadata)
    return buf.getvalue()
