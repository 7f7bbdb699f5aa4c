"""Write a torch.save-compatible file one tensor at a time (bounded memory).

torch.save pickles the whole object first, so every tensor must exist at once. Here each tensor's
storage is written as a zip record as soon as it exists and only a placeholder is kept; the pickle
(`data.pkl`, whose persistent ids name those records) goes last. The result loads with
`torch.load(weights_only=True, mmap=True)`. (litgpt's incremental_save uses the same technique.)
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch.serialization import _get_storage_alignment, get_crc32_options


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class SavedTensor:
    """Placeholder that pickles exactly like the tensor it stands for."""

    def __init__(self, ref: _StorageRef, shape: torch.Size):
        self.ref, self.shape = ref, shape

    def __reduce_ex__(self, protocol: int):
        stride = torch.empty(self.shape, device="meta").stride()
        return torch._utils._rebuild_tensor_v2, (self.ref, 0, tuple(self.shape), stride, False, OrderedDict())


class IncrementalTorchWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.zip = torch._C.PyTorchFileWriter(str(self.path), get_crc32_options(), _get_storage_alignment())
        self.count = 0

    def tensor(self, value: torch.Tensor) -> SavedTensor:
        """Write the tensor's bytes now; return the placeholder to put in the object."""
        value = value.detach().contiguous().cpu()
        key = str(self.count)
        self.count += 1
        nbytes = value.numel() * value.element_size()
        start = value.storage_offset() * value.element_size()
        # a contiguous view (a TP shard of a bigger tensor) is written from its own bytes: no copy
        storage = value.untyped_storage()[start : start + nbytes] if nbytes else value.untyped_storage()
        self.zip.write_record(f"data/{key}", storage, nbytes)
        return SavedTensor(_StorageRef(key, value.dtype, value.numel()), value.shape)

    def finish(self, obj: Any) -> None:
        """Pickle `obj` (holding placeholders) as data.pkl and close the archive."""
        buf = io.BytesIO()

        class _Pickler(pickle.Pickler):
            def persistent_id(self, o: Any):
                if isinstance(o, _StorageRef):
                    storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[o.dtype])
                    return ("storage", storage_type, o.key, "cpu", o.numel)
                return None

        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self.zip.write_record("data.pkl", data, len(data))
        self.zip.write_record(".format_version", "1", 1)
        alignment = str(_get_storage_alignment())
        self.zip.write_record(".storage_alignment", alignment, len(alignment))
        self.zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.zip.write_end_of_file()
