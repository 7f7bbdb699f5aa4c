"""Megatron's indexed dataset (megatron/core/datasets/indexed_dataset.py), byte for byte, so a corpus
prepared here trains in Megatron-LM and a corpus Megatron-LM prepared trains here:

- `<prefix>.bin`: the token ids of every sequence, concatenated, in one dtype (uint16 when the
  vocabulary has fewer than 65500 ids, else int32: `DType.optimal_dtype`).
- `<prefix>.idx`: `MMIDIDX\\x00\\x00`, version 1 (<Q), dtype code (<B), sequence count (<Q),
  document count (<Q, = documents + 1), sequence lengths (int32), sequence byte pointers (int64),
  document indices (int64, the sequence index where each document starts, plus the end), then
  optionally one int8 mode per sequence (multimodal).
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mzoo.data.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequences, documents
# Megatron's DType enum: the code stored in the .idx for the .bin's element type.
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                                7: np.float32, 8: np.uint16}
CODE_OF_DTYPE: dict[type, int] = {v: k for k, v in DTYPE_CODES.items()}

PathLike = Union[str, os.PathLike]


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """Megatron's `DType.optimal_dtype`: uint16 below 65500 ids (half the disk), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def normalize_prefix(prefix: PathLike) -> str:
    """Accept `corpus`, `corpus.bin` or `corpus.idx` for the same dataset (a common slip)."""
    text = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix) and not bin_path(text).exists() and idx_path(text[: -len(suffix)]).exists():
            return text[: -len(suffix)]
    return text


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class IndexedDatasetWriter:
    """Writes `<prefix>.bin` and `<prefix>.idx` under temporary names and renames them last (.idx
    after .bin), so a killed or failed run never leaves a dataset that looks complete.

    Use as a context manager: leaving the block normally finalizes, an exception removes everything."""

    def __init__(self, prefix: PathLike, dtype: type = np.int32, multimodal: bool = False):
        if np.dtype(dtype).type not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {dtype} has no Megatron DType code")
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype).type
        self.multimodal = multimodal
        self._itemsize = np.dtype(self.dtype).itemsize
        parent = Path(self.prefix).parent
        tag = f".mzoo-tmp-{os.getpid()}-{os.urandom(3).hex()}"
        self._tmp_bin = parent / (bin_path(self.prefix).name + tag)
        self._tmp_idx = parent / (idx_path(self.prefix).name + tag)
        self._bin = open(self._tmp_bin, "wb")
        fcntl.flock(self._bin.fileno(), fcntl.LOCK_EX)  # a live writer's temporaries are never swept
        self._lengths: list[np.ndarray] = []
        self._modes: list[np.ndarray] = []
        self._doc_ends: list[int] = [0]  # document_indices: sequence index where each document ends
        self.num_sequences = 0
        self.num_tokens = 0
        self._done = False

    @property
    def num_documents(self) -> int:
        return len(self._doc_ends) - 1

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Optional[Sequence[int]] = None,
                     modes: Optional[Sequence[int]] = None) -> None:
        """One document: its tokens, split into sequences of `lengths` (default: one sequence)."""
        arr = np.asarray(tokens)
        self.add_documents(arr, np.asarray([arr.size] if lengths is None else lengths, dtype=np.int64),
                           None if lengths is None else [len(lengths)], modes)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, sequences_per_document: Optional[Sequence[int]] = None,
                      modes: Optional[Sequence[int]] = None) -> None:
        """Many documents at once: `tokens` concatenated, `lengths` per sequence, one sequence per
        document unless `sequences_per_document` says otherwise (the fast path for `prepare`)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        flat = np.ascontiguousarray(tokens, dtype=self.dtype)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())} but {flat.size} tokens were given")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence is longer than 2**31 - 1 tokens, which the .idx cannot record")
        self._bin.write(flat.tobytes(order="C"))
        self._lengths.append(lengths.astype(np.int32))
        if self.multimodal:
            self._modes.append(np.zeros(lengths.size, np.int8) if modes is None else np.asarray(modes, np.int8))
        per_doc = np.ones(lengths.size, np.int64) if sequences_per_document is None else np.asarray(sequences_per_document)
        ends = self.num_sequences + np.cumsum(per_doc)
        self._doc_ends.extend(int(e) for e in ends)
        self.num_sequences += int(lengths.size)
        self.num_tokens += int(flat.size)

    def finalize(self) -> None:
        """Write the index, fsync, rename both files into place (.bin first, .idx last); on a failure
        (a full disk) the temporaries are removed."""
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise

    def _finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        modes = (np.concatenate(self._modes) if self._modes else np.zeros(0, np.int8)) if self.multimodal else None
        with open(self._tmp_idx, "wb") as f:
            write_index(f, self.dtype, lengths, np.asarray(self._doc_ends, np.int64), modes)
        switch_pair(self._tmp_bin, self._tmp_idx, self.prefix)
        self._done = True

    def abort(self) -> None:
        """Remove the temporary files; nothing under the final names is touched."""
        if not self._bin.closed:
            self._bin.close()
        for tmp in (self._tmp_bin, self._tmp_idx):
            tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_index(f, dtype: type, sequence_lengths: np.ndarray, document_indices: np.ndarray,
                sequence_modes: Optional[np.ndarray] = None) -> None:
    """The .idx bytes, field by field as megatron-core's `_IndexWriter` writes them."""
    itemsize = np.dtype(dtype).itemsize
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    f.write(INDEX_HEADER)
    f.write(struct.pack("<Q", INDEX_VERSION))
    f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype).type]))
    f.write(struct.pack("<Q", lengths.size))
    f.write(struct.pack("<Q", len(document_indices)))
    f.write(lengths.tobytes(order="C"))
    f.write(pointers.tobytes(order="C"))
    f.write(np.asarray(document_indices, dtype=np.int64).tobytes(order="C"))
    if sequence_modes is not None:
        f.write(np.asarray(sequence_modes, dtype=np.int8).tobytes(order="C"))


def pending_path(prefix: PathLike) -> Path:
    """Present while (or after an interrupted) switch of a pair: the .bin and .idx may not match."""
    return idx_path(prefix).with_name(idx_path(prefix).name + ".mzoo-tmp-pair")


def switch_pair(tmp_bin: Path, tmp_idx: Path, prefix: PathLike) -> None:
    """Rename the new .bin and .idx in as a pair: a marker, locked by this writer, exists from before
    the first rename until after the second, so a reader never pairs a new .bin with an old .idx."""
    from mzoo.ckpt.atomic import fault

    _fsync(tmp_bin)
    _fsync(tmp_idx)
    marker = pending_path(prefix)
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(tmp_bin, bin_path(prefix))
        fault("data-between-renames")
        os.replace(tmp_idx, idx_path(prefix))
        _fsync_dir(marker.parent)
        marker.unlink()
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexedDataset:
    """Reads `<prefix>.bin/.idx` through numpy memmaps, validating the header and the sizes first
    (a truncated copy is reported, not read as garbage). `ds[i]` is sequence i's tokens."""

    def __init__(self, prefix: PathLike):
        self.prefix = normalize_prefix(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        missing = [p.name for p in (ipath, bpath) if not p.exists()]
        if missing:
            raise DataError(f"dataset {self.prefix} is missing {' and '.join(missing)}; give the prefix that "
                            f"`mzoo data prepare --out` wrote (without .bin/.idx).")
        if pending_path(self.prefix).exists():
            raise DataError(f"dataset {self.prefix} was being replaced when its writer stopped (the .bin and .idx "
                            f"may be from different runs); re-run `mzoo data prepare --overwrite`.")
        idx_size = ipath.stat().st_size
        with open(ipath, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise DataError(f"{ipath} is not a Megatron indexed-dataset index (bad header); re-run `mzoo data prepare`.")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
        if version != INDEX_VERSION:
            raise DataError(f"{ipath} has index version {version}, but only version {INDEX_VERSION} exists; re-run `mzoo data prepare`.")
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath} declares unknown dtype code {code}; the file is corrupt, re-run `mzoo data prepare`.")
        self.dtype = DTYPE_CODES[code]
        expected = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        if idx_size not in (expected, expected + n_seq):
            raise DataError(f"{ipath} is {idx_size} bytes but its header needs {expected}; the file is truncated "
                            f"or corrupt, copy it again or re-run `mzoo data prepare`.")
        self.multimodal = idx_size == expected + n_seq and n_seq > 0
        index = np.memmap(ipath, mode="r", dtype=np.uint8) if idx_size else np.zeros(0, np.uint8)
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(index, np.int32, n_seq, off)
        self.sequence_pointers = np.frombuffer(index, np.int64, n_seq, off + 4 * n_seq)
        self.document_indices = np.frombuffer(index, np.int64, n_doc, off + 12 * n_seq)
        self.sequence_modes = (np.frombuffer(index, np.int8, n_seq, off + 12 * n_seq + 8 * n_doc)
                               if self.multimodal else None)
        if n_doc < 1 or self.document_indices[-1] != n_seq:
            raise DataError(f"{ipath} is inconsistent (its document index does not end at its {n_seq} sequences); "
                            "re-run `mzoo data prepare`.")
        itemsize = np.dtype(self.dtype).itemsize
        need = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize if n_seq else 0
        bin_size = bpath.stat().st_size
        if bin_size < need:
            raise DataError(f"{bpath} is {bin_size} bytes but its index points to {need}; the file is truncated, "
                            "copy it again or re-run `mzoo data prepare`.")
        if bin_size > need:
            raise DataError(f"{bpath} is {bin_size} bytes but {ipath.name} describes {need}: the two files are not "
                            "one pair (another run's .bin?); copy them together or re-run `mzoo data prepare`.")
        self._check_index(ipath, bpath, bin_size, itemsize)
        self._tokens = (np.memmap(bpath, mode="r", dtype=self.dtype, shape=(bin_size // itemsize,))
                        if bin_size >= itemsize else np.zeros(0, self.dtype))
        self._itemsize = itemsize

    def _check_index(self, ipath: Path, bpath: Path, bin_size: int, itemsize: int, block: int = 1 << 22) -> None:
        """Every sequence lies inside the .bin and the documents are in order, or one sentence says
        where the index is corrupt (a vectorised pass over the index, in blocks)."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        redo = "copy it again or re-run `mzoo data prepare`"
        for start in range(0, lengths.shape[0], block):
            n = lengths[start:start + block].astype(np.int64)
            p = pointers[start:start + block]
            bad = (n < 0) | (p < 0) | (p > bin_size) | (p % itemsize != 0)
            end = np.where(bad, 0, p) + np.where(bad, 0, n) * itemsize
            bad |= end > bin_size
            if bad.any():
                i = start + int(np.argmax(bad))
                raise DataError(f"{ipath} is corrupt: sequence {i} (length {int(lengths[i])}, byte offset "
                                f"{int(pointers[i])}) does not lie inside the {bin_size} bytes of {bpath.name}; {redo}.")
        for start in range(0, docs.shape[0], block):
            d = docs[max(0, start - 1):start + block]
            if (d < 0).any() or (d > lengths.shape[0]).any() or (np.diff(d) < 0).any():
                raise DataError(f"{ipath} is corrupt: its document index is not an increasing list of sequence "
                                f"numbers between 0 and {lengths.shape[0]}; {redo}.")

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens `offset .. offset+length` of sequence `idx` (a view into the memmap)."""
        size = int(self.sequence_lengths[idx])
        length = size - offset if length is None else int(length)
        start = int(self.sequence_pointers[idx]) // self._itemsize + int(offset)
        return self._tokens[start: start + length]

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(int(idx))

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences, concatenated)."""
        beg, end = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if end == beg:
            return np.zeros(0, self.dtype)
        return np.concatenate([self.get(i) for i in range(beg, end)])
