"""Training data: Megatron's indexed datasets, GPT samples over them, blends, tokenizers, `prepare`.

Everything on disk is Megatron's own format, so a corpus prepared here trains in Megatron-LM and a
corpus Megatron-LM prepared trains here:

- `<prefix>.bin`: the token ids of every sequence, concatenated, in one dtype (uint16 when the
  vocabulary has fewer than 65500 ids, else int32: `DType.optimal_dtype`).
- `<prefix>.idx`: `MMIDIDX\\x00\\x00`, version 1 (<Q), dtype code (<B), sequence count (<Q),
  document count (<Q, = documents + 1), sequence lengths (int32), sequence byte pointers (int64),
  document indices (int64, the sequence index where each document starts, plus the end), then
  optionally one int8 mode per sequence (multimodal).

The GPT dataset reproduces megatron-core's index construction (document / sample / shuffle indices
drawn from the same `numpy.random.RandomState(seed)` calls, the same greedy blending), so for the
same prefix, split, sequence length, seed and sample count it yields the same sample at the same
index as Megatron's GPTDataset. A training run addresses data only by global sample index (the
consumed-samples counter), so it resumes at the same place whatever its data-parallel size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import struct
import tempfile
import time
import warnings
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from mzoo.errors import UserError


class DataError(UserError):
    """Input data, a dataset on disk or a tokenizer is missing or unusable; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# The indexed dataset format (megatron/core/datasets/indexed_dataset.py)
# --------------------------------------------------------------------------------------------------

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


def _replace_atomically(tmp: Path, dst: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, dst)


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
        """Write the index, fsync, rename both files into place (.bin first, .idx last)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        modes = (np.concatenate(self._modes) if self._modes else np.zeros(0, np.int8)) if self.multimodal else None
        with open(self._tmp_idx, "wb") as f:
            write_index(f, self.dtype, lengths, np.asarray(self._doc_ends, np.int64), modes)
        _replace_atomically(self._tmp_bin, bin_path(self.prefix))
        _replace_atomically(self._tmp_idx, idx_path(self.prefix))
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


# --------------------------------------------------------------------------------------------------
# Index construction, as megatron-core's GPTDataset / BlendedDataset / helpers.cpp do it
# --------------------------------------------------------------------------------------------------

SPLITS = ("train", "valid", "test")


def parse_split(split: str) -> list[Optional[tuple[float, float]]]:
    """'98,2' -> [(0, .98), (.98, 1.0), None]: Megatron's parse_and_normalize_split and split
    matrix. Each split owns a disjoint range of the dataset's sequences (documents)."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not parts or len(parts) > 3 or sum(parts) <= 0:
        raise DataError(f"cannot read split '{split}'; write train,valid[,test] weights like 98,2 or 969,30,1.")
    parts += [0.0] * (3 - len(parts))
    total = float(np.sum(np.array(parts, np.float64)))
    weights = (np.array(parts, np.float64) / total).tolist()
    ends = [0.0]
    for w in weights:
        ends.append(ends[-1] + w)
    return [(a, b) if b > a else None for a, b in zip(ends[:-1], ends[1:])]


def split_range(bookends: tuple[float, float], num_elements: int) -> tuple[int, int]:
    """The sequence index range [beg, end) of one split, rounded like Megatron's builder."""
    return int(round(bookends[0] * float(num_elements))), int(round(bookends[1] * float(num_elements)))


def num_epochs_for(num_samples: Optional[int], tokens_per_epoch: int, seq_len: int) -> int:
    """Epochs needed for `num_samples` samples of seq_len + 1 tokens (Megatron's _get_num_epochs)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_len + 1
    return max(1, math.ceil(needed / tokens_per_epoch)) if tokens_per_epoch > 0 else 1


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """Every document once per epoch, shuffled (the final epoch separately when it is short, so a
    partial last epoch still sees a uniform sample of documents)."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents), num_epochs).astype(np.int32)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_len: int, num_epochs: int,
                       tokens_per_epoch: int) -> np.ndarray:
    """[num_samples + 1, 2] (position in document_index, token offset) where each sample starts.

    Sample i is the tokens at flat positions [i*seq_len, i*seq_len + seq_len + 1) of the documents
    concatenated in document_index order: consecutive samples share one token, so every token is
    predicted exactly once. Same boundaries as helpers.cpp build_sample_idx (last partial sample
    dropped), computed with a vectorised search instead of a loop."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    lengths = np.asarray(sizes, dtype=np.int64)[document_index]
    starts = np.concatenate(([0], np.cumsum(lengths)))
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    doc = np.searchsorted(starts, positions, side="right") - 1
    dtype = np.int32 if max(len(document_index), int(np.max(sizes, initial=0))) <= np.iinfo(np.int32).max else np.int64
    return np.stack([doc, positions - starts[doc]], axis=1).astype(dtype)


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples), then of [num_samples, total_size) when they differ."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index within it) for `size` blended samples: at every step take the
    dataset furthest behind its weight (helpers.cpp build_blending_indices, same float arithmetic
    and tie-breaking), so the mix is exact at every prefix of the stream, deterministic, no RNG."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for s in range(size):
        x = max(float(s), 1.0)
        best, best_err = 0, w[0] * x - counts[0]
        for d in range(1, len(w)):
            err = w[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[s] = best
        sample_index[s] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of every dataset exactly once, interleaved in proportion to the sizes
    (helpers.cpp build_exhaustive_blending_indices)."""
    total = int(sum(sizes))
    w = [s / float(total) for s in sizes]
    counts = [0] * len(sizes)
    unspent = [d for d in range(len(sizes)) if sizes[d] > 0]
    dataset_index = np.zeros(total, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    for s in range(total):
        x = max(float(s), 1.0)
        best, best_err = -1, -math.inf
        for d in unspent:
            err = w[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[s] = best
        sample_index[s] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
    return dataset_index, sample_index


# --------------------------------------------------------------------------------------------------
# The index cache: .npy files next to the data, named by a hash of what determines them
# --------------------------------------------------------------------------------------------------

CACHE_FORMAT = "mzoo-gpt-indices-1"


def default_cache_dir(prefix: str) -> Path:
    return Path(f"{prefix}.cache")


def _description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode(), usedforsecurity=False).hexdigest()


def _save_npy_atomically(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".mzoo-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_indices(cache_dir: Optional[Path], name: str, description: dict, kinds: Sequence[str],
                   build: Callable[[], Sequence[np.ndarray]]) -> tuple[list[np.ndarray], bool]:
    """Load `kinds` arrays from `cache_dir/<name>-<hash>-<kind>.npy`, or build and save them.

    Each file is written atomically and the description file last, so a present description means a
    complete, matching set (ranks that race to build write identical files). Returns (arrays, hit).
    An unwritable cache folder only costs the rebuild next time."""
    if cache_dir is None:
        return list(build()), False
    base = f"{name}-{_description_hash(description)}"
    paths = [cache_dir / f"{base}-{k}.npy" for k in kinds]
    desc_path = cache_dir / f"{base}-description.json"
    if desc_path.exists() and all(p.exists() for p in paths):
        return [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths], True
    arrays = list(build())
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for p, a in zip(paths, arrays):
            _save_npy_atomically(p, a)
        fd, tmp = tempfile.mkstemp(prefix=desc_path.name + ".", suffix=".mzoo-tmp", dir=cache_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, desc_path)
    except OSError as e:
        warnings.warn(f"could not cache dataset indices in {cache_dir} ({e}); they will be rebuilt next time")
    return arrays, False


# --------------------------------------------------------------------------------------------------
# GPT datasets: samples of seq_len + 1 tokens over one indexed dataset, blends, mock data
# --------------------------------------------------------------------------------------------------

Sample = dict  # {"tokens": int64 [seq_len], "labels": int64 [seq_len]} as torch tensors


def _as_sample(text: np.ndarray) -> Sample:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(text, dtype=np.int64))
    return {"tokens": t[:-1], "labels": t[1:]}


class GPTDataset:
    """Megatron's GPTDataset over the sequences `indices` of one IndexedDataset.

    `num_samples` None gives one epoch; more samples than an epoch holds repeat the data in freshly
    shuffled epochs. `ds.tokens(i)` is sample i's seq_len + 1 token ids, `ds[i]` (and `ds(i)`, the
    trainer's sampler protocol) the {"tokens", "labels"} pair."""

    def __init__(self, dataset: IndexedDataset, indices: np.ndarray, num_samples: Optional[int], split: str,
                 seq_len: int, seed: int, cache_dir: Optional[Path] = None):
        if seq_len < 1:
            raise DataError(f"sequence length must be at least 1, not {seq_len}.")
        self.dataset, self.indices, self.num_samples = dataset, np.asarray(indices, np.int32), num_samples
        self.split, self.seq_len, self.seed = split, seq_len, seed
        tokens_per_epoch = int(np.sum(dataset.sequence_lengths[self.indices], dtype=np.int64))
        if tokens_per_epoch < seq_len + 1:
            raise DataError(
                f"the {split} split of {dataset.prefix} has {tokens_per_epoch} tokens in {len(self.indices)} "
                f"documents, fewer than one sample of {seq_len + 1}; use more data, a shorter sequence or a "
                f"larger {split} share in --split.")
        self.description = {
            "format": CACHE_FORMAT, "class": "GPTDataset", "path": str(Path(dataset.prefix).resolve()),
            "idx_bytes": idx_path(dataset.prefix).stat().st_size, "bin_bytes": bin_path(dataset.prefix).stat().st_size,
            "split": split, "sequences": [int(self.indices[0]), int(self.indices[-1]) + 1],
            "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
        }
        arrays, self.cache_hit = cached_indices(
            cache_dir, f"GPTDataset-{split}", self.description,
            ("document_index", "sample_index", "shuffle_index"), lambda: self._build(tokens_per_epoch))
        self.document_index, self.sample_index, self.shuffle_index = arrays

    def _build(self, tokens_per_epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seq_len, num_samples = self.seq_len, self.num_samples
        num_epochs = num_epochs_for(num_samples, tokens_per_epoch, seq_len)
        separate_final_epoch = False
        sans_final = 0
        if num_epochs > 1:
            sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len
            per_epoch = (tokens_per_epoch - 1) // seq_len
            separate_final_epoch = (num_samples - sans_final) < int(0.80 * per_epoch)
        rng = np.random.RandomState(self.seed)
        document_index = build_document_index(self.indices, num_epochs, rng, separate_final_epoch)
        sample_index = build_sample_index(self.dataset.sequence_lengths, document_index, seq_len, num_epochs,
                                          tokens_per_epoch)
        total = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(sans_final if separate_final_epoch else total, total, rng)
        return document_index, sample_index, shuffle_index

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def tokens(self, idx: int) -> np.ndarray:
        """Sample idx: seq_len + 1 consecutive tokens of the shuffled document stream, int64."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} is outside this {self.split} dataset of {len(self)} samples")
        i = int(self.shuffle_index[idx])
        (doc_beg, off_beg), (doc_end, off_end) = self.sample_index[i], self.sample_index[i + 1]
        doc_beg, doc_end, off_beg, off_end = int(doc_beg), int(doc_end), int(off_beg), int(off_end)
        if doc_beg == doc_end:
            parts = [self.dataset.get(int(self.document_index[doc_beg]), off_beg, off_end - off_beg + 1)]
        else:
            parts = [self.dataset.get(int(self.document_index[doc_beg]), off_beg)]
            parts += [self.dataset.get(int(self.document_index[d])) for d in range(doc_beg + 1, doc_end)]
            parts.append(self.dataset.get(int(self.document_index[doc_end]), 0, off_end + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> Sample:
        return _as_sample(self.tokens(int(idx)))

    __call__ = __getitem__


class BlendedDataset:
    """Samples drawn from several datasets in fixed proportions: sample i comes from
    datasets[dataset_index[i]] at dataset_sample_index[i] (deterministic greedy blending)."""

    def __init__(self, datasets: Sequence[GPTDataset], weights: Optional[Sequence[float]], size: Optional[int],
                 cache_dir: Optional[Path] = None):
        self.datasets = list(datasets)
        self.weights = list(weights) if weights is not None else None
        self.size = size
        self.description = {"format": CACHE_FORMAT, "class": "BlendedDataset",
                            "datasets": [d.description for d in self.datasets], "weights": self.weights,
                            "size": size}
        (self.dataset_index, self.dataset_sample_index), self.cache_hit = cached_indices(
            cache_dir, f"BlendedDataset-{self.datasets[0].split}", self.description,
            ("dataset_index", "dataset_sample_index"), self._build)

    def _build(self) -> tuple[np.ndarray, np.ndarray]:
        if self.size is None:
            dataset_index, sample_index = build_exhaustive_blending_indices([int(w) for w in self.weights])
        else:
            dataset_index, sample_index = build_blending_indices(self.weights, self.size)
        ids, counts = np.unique(dataset_index, return_counts=True)
        for d, n in zip(ids, counts):
            if n > len(self.datasets[d]):
                raise DataError(f"the blend asks {n} samples of {self.datasets[d].dataset.prefix}, which has only "
                                f"{len(self.datasets[d])}; lower the number of samples or raise its weight.")
        return dataset_index, sample_index

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def tokens(self, idx: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[idx])].tokens(int(self.dataset_sample_index[idx]))

    def __getitem__(self, idx: int) -> Sample:
        return _as_sample(self.tokens(int(idx)))

    __call__ = __getitem__


class MockGPTDataset:
    """Random tokens, no files (`--mock-data`): sample i depends only on (seed, i), so it is the same
    at any parallel layout and after a resume."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 1234, num_samples: Optional[int] = None):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_samples = num_samples if num_samples is not None else 2**62

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} is outside this mock dataset of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, int(idx)])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)

    def __getitem__(self, idx: int) -> Sample:
        return _as_sample(self.tokens(int(idx)))

    __call__ = __getitem__


def parse_blend(items: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """Megatron's --data-path list: 'p1 p2' (weights from sizes) or '30 p1 70 p2' (weights given)."""
    items = [str(x) for x in items]
    if len(items) % 2 == 0 and items:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            return items, None
        if any(w <= 0 for w in weights):
            raise DataError(f"blend weights must be positive, got {weights}.")
        return items[1::2], weights
    return items, None


@dataclass
class DataConfig:
    """What the GPT training data is: a blend of prefixes (or mock data), split, sequence length, seed."""

    prefixes: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None  # None: in proportion to each dataset's size
    split: str = "969,30,1"  # Megatron-LM's default train,valid,test shares of every dataset
    seq_len: int = 1024
    seed: int = 1234
    cache_dir: Optional[Path] = None  # default: <prefix>.cache next to the data (blends: next to the first)
    mock: bool = False
    vocab_size: Optional[int] = None  # mock data only
    surplus: float = 0.005  # extra samples each blended dataset builds (Megatron's mid_level_dataset_surplus)


Dataset = Union[GPTDataset, BlendedDataset, MockGPTDataset]


def data_config_from_flags(data: Sequence[str], split: str, mock: bool, tokenizer: Optional[PathLike],
                           vocab_size: int) -> DataConfig:
    """The training data a command line asks for, checked before any process starts: blend syntax,
    split, every .bin/.idx readable, the tokenizer fitting the model."""
    if tokenizer is not None:
        check_tokenizer_fits(load_tokenizer(tokenizer), vocab_size)
    if mock and data:
        raise DataError("pass either --data or --mock-data, not both.")
    if not mock and not data:
        raise DataError("no training data: pass --data PREFIX (from `mzoo data prepare`) or --mock-data.")
    if mock:
        return DataConfig(mock=True)
    prefixes, weights = parse_blend(data)
    parse_split(split)
    for prefix in prefixes:
        IndexedDataset(prefix)  # missing or truncated .bin/.idx: one sentence now
    return DataConfig(prefixes=prefixes, weights=weights, split=split)


def build_gpt_datasets(cfg: DataConfig, num_samples: Sequence[Optional[int]] = (None, None, None)
                       ) -> list[Optional[Dataset]]:
    """[train, valid, test] datasets, like Megatron's BlendedMegatronDatasetBuilder with GPTDataset.

    `num_samples[i]` is how many samples split i must provide (None: one epoch). A split whose share
    is zero is None. With weights, each split is a BlendedDataset of about num_samples[i] samples."""
    if cfg.mock:
        if not cfg.vocab_size:
            raise DataError("mock data needs the model's vocabulary size.")
        return [MockGPTDataset(cfg.vocab_size, cfg.seq_len, cfg.seed + i, n) for i, n in enumerate(num_samples)]
    if not cfg.prefixes:
        raise DataError("no data given; pass dataset prefixes written by `mzoo data prepare`, or use --mock-data.")
    if cfg.weights is not None and len(cfg.weights) != len(cfg.prefixes):
        raise DataError(f"{len(cfg.weights)} weights for {len(cfg.prefixes)} datasets; give one weight per prefix.")
    bookends = parse_split(cfg.split)
    if cfg.weights is not None:
        missing = [SPLITS[i] for i, b in enumerate(bookends) if b is not None and num_samples[i] is None]
        if missing:
            raise DataError(f"weighted blends need a sample count for the {', '.join(missing)} split; give one or "
                            "drop the weights.")
    datasets = [IndexedDataset(p) for p in cfg.prefixes]
    cache = [cfg.cache_dir or default_cache_dir(d.prefix) for d in datasets]

    def mid_level(d: int, i: int, n: Optional[int]) -> GPTDataset:
        beg, end = split_range(bookends[i], len(datasets[d]))
        return GPTDataset(datasets[d], np.arange(beg, end, dtype=np.int32), n, SPLITS[i], cfg.seq_len, cfg.seed, cache[d])

    out: list[Optional[Dataset]] = []
    for i, bookend in enumerate(bookends):
        n = num_samples[i]
        if bookend is None:
            out.append(None)
        elif len(datasets) == 1 and cfg.weights is None:
            out.append(mid_level(0, i, n))
        elif cfg.weights is not None:
            w = (np.array(cfg.weights, np.float64) / np.sum(np.array(cfg.weights, np.float64))).tolist()
            target = [int(math.ceil(n * wi)) for wi in w]
            buffer = [int(math.ceil(math.ceil(n * wi) * (1 + cfg.surplus))) for wi in w]
            parts = [mid_level(d, i, buffer[d]) for d in range(len(datasets))]
            out.append(BlendedDataset(parts, w, sum(target), cache[0]))
        else:
            parts = [mid_level(d, i, None) for d in range(len(datasets))]
            sizes = [len(p) for p in parts]
            size = None if n is None else min(n, sum(sizes))
            weights = sizes if size is None else (np.array(sizes, np.float64) / sum(sizes)).tolist()
            out.append(BlendedDataset(parts, weights, size, cache[0]))
    return out


# --------------------------------------------------------------------------------------------------
# Which global samples a data-parallel rank trains on
# --------------------------------------------------------------------------------------------------


def global_sample_indices(consumed_samples: int, global_batch: int, dp_rank: int, dp_size: int,
                          micro_batch: int) -> list[list[int]]:
    """The micro-batches (global sample indices) DP rank `dp_rank` trains on in the global batch that
    starts at `consumed_samples`, as Megatron-LM's MegatronPretrainingSampler assigns them: each
    micro-step takes the next micro_batch * dp_size samples and rank r the r-th slice of them.

    The union over ranks and micro-steps is always [consumed, consumed + global_batch), so the data
    depends only on the consumed-samples counter: a resumed run continues where it stopped, at any
    DP size."""
    per_step = micro_batch * dp_size
    if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"invalid data-parallel rank {dp_rank} of {dp_size} with micro batch {micro_batch}.")
    if global_batch % per_step:
        raise DataError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x data "
                        f"parallel {dp_size}; change one of them.")
    out = []
    for m in range(global_batch // per_step):
        start = consumed_samples + m * per_step + dp_rank * micro_batch
        out.append(list(range(start, start + micro_batch)))
    return out


def collate(dataset: Dataset, indices: Sequence[int]) -> Sample:
    """Stack samples into {"tokens": [b, seq_len], "labels": [b, seq_len]}."""
    import torch

    samples = [dataset[i] for i in indices]
    return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels")}


# --------------------------------------------------------------------------------------------------
# Tokenizers from a local folder
# --------------------------------------------------------------------------------------------------

_HF_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")


@dataclass
class Tokenizer:
    """What data preparation needs from a tokenizer, whichever library loaded it.

    `encode` adds the tokenizer's own special tokens (a Llama tokenizer's BOS), as Megatron's
    preprocess_data does; `eod_id` is what --append-eod appends (the EOS token)."""

    path: Path
    backend: Any  # a transformers tokenizer or a tokenizers.Tokenizer
    vocab_size: int
    eod_id: Optional[int]

    @property
    def is_transformers(self) -> bool:
        return not type(self.backend).__module__.startswith("tokenizers")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.is_transformers:
            out = self.backend(list(texts), return_attention_mask=False, return_token_type_ids=False)
            return list(out["input_ids"])
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]


def _raw_tokenizer(path: Path, file: Path) -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    try:
        raw = RawTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exceptions with a Rust message
        raise DataError(f"{file} is not a readable tokenizers file ({str(e).splitlines()[0]}); save it again.") from None
    vocab = raw.get_vocab(with_added_tokens=True)
    eod = next((vocab[name] for name in _EOD_NAMES if name in vocab), None)
    size = max(raw.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    return Tokenizer(path, raw, size, eod)


def load_tokenizer(path: PathLike) -> Tokenizer:
    """A tokenizer from a local folder (transformers' AutoTokenizer, offline) or a tokenizer.json
    file or folder (the tokenizers library). Never touches the network."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer {path} does not exist; pass --tokenizer a folder saved with save_pretrained "
                        "or a tokenizer.json file.")
    if path.is_file():
        return _raw_tokenizer(path, path)
    present = [f for f in _HF_FILES if (path / f).exists()]
    if not present:
        raise DataError(f"{path} has no tokenizer (no tokenizer.json or tokenizer_config.json); pass --tokenizer a "
                        "folder saved with save_pretrained or a tokenizer.json file.")
    if "tokenizer_config.json" not in present and "tokenizer.json" in present:
        return _raw_tokenizer(path, path / "tokenizer.json")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; fall back to the plain file when there is one
        if (path / "tokenizer.json").exists():
            return _raw_tokenizer(path, path / "tokenizer.json")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"transformers cannot load the tokenizer in {path} ({first.rstrip('.')}); save it with "
                        "save_pretrained or add its tokenizer.json.") from None
    eod = tok.eos_token_id
    vocab = tok.get_vocab()
    if eod is None:
        eod = next((vocab[name] for name in _EOD_NAMES if name in vocab), None)
    size = max(len(tok), max(vocab.values(), default=-1) + 1)
    return Tokenizer(path, tok, size, eod)


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Number of token ids a tokenizer can emit (mzoo Tokenizer, transformers or tokenizers object)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.vocab_size
    if hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        return max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


def check_tokenizer_fits(tokenizer: Any, vocab_size: int) -> None:
    """Fail before training when the tokenizer can emit ids the model's embedding does not have."""
    n = tokenizer_vocab_size(tokenizer)
    if n > vocab_size:
        raise DataError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; use the "
                        f"tokenizer the model was built for or a model with vocab_size >= {n}.")


# --------------------------------------------------------------------------------------------------
# prepare: jsonl / parquet -> tokens -> indexed dataset
# --------------------------------------------------------------------------------------------------

INPUT_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass
class PrepareConfig:
    inputs: list[Path]
    tokenizer: Path
    out: str  # prefix: writes <out>.bin and <out>.idx
    key: str = "text"
    workers: int = 1
    append_eod: bool = False
    overwrite: bool = False
    chunk_docs: int = 256  # documents per task sent to a worker


@dataclass
class PrepareSummary:
    documents: int
    tokens: int
    skipped: int  # documents that tokenized to nothing
    seconds: float
    dtype: str
    vocab_size: int
    prefix: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "tokens_per_s": round(self.tokens_per_s, 1), "dtype": self.dtype,
                "vocab_size": self.vocab_size, "bin": str(bin_path(self.prefix)), "idx": str(idx_path(self.prefix))}


def check_inputs(inputs: Sequence[PathLike]) -> list[tuple[Path, str]]:
    """(path, kind) for every input, failing before any work on a missing or unreadable one."""
    if not inputs:
        raise DataError("no input files given; pass one or more .jsonl or .parquet files.")
    out = []
    for p in map(Path, inputs):
        if not p.is_file():
            raise DataError(f"input file {p} does not exist; check the path.")
        kind = INPUT_KINDS.get(p.suffix.lower())
        if kind is None:
            raise DataError(f"{p} is neither .jsonl nor .parquet; convert it to JSON lines with one document per line.")
        if kind == "parquet":
            try:
                import pyarrow.parquet  # noqa: F401
            except ImportError:
                raise DataError(f"reading {p} needs pyarrow, which is not installed; pip install pyarrow "
                                "(or convert the file to .jsonl).") from None
        out.append((p, kind))
    return out


def check_output(prefix: str, overwrite: bool) -> None:
    parent = Path(prefix).parent
    if not parent.is_dir():
        raise DataError(f"the output folder {parent} does not exist; create it first.")
    existing = [p for p in (bin_path(prefix), idx_path(prefix)) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists; remove it or pass --overwrite.")


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where} has a '{key}' that is {type(value).__name__}, not text; fix the record or pass "
                        "--key with the field that holds the text.")
    return value


def _iter_jsonl(path: Path, key: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)  # blank lines are not documents; still count the bytes
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise DataError(f"{path}:{lineno} is not valid JSON ({msg}); fix or remove that line.") from None
            if not isinstance(record, dict) or key not in record:
                raise DataError(f"{path}:{lineno} has no '{key}' field; pass --key with the field that holds the text.")
            yield _text(record[key], f"{path}:{lineno}", key), len(line)


def _iter_parquet(path: Path, key: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if key not in pf.schema_arrow.names:
        raise DataError(f"{path} has no '{key}' column (it has {', '.join(pf.schema_arrow.names)}); pass --key.")
    size, rows = path.stat().st_size, max(pf.metadata.num_rows, 1)
    done = 0
    for batch in pf.iter_batches(columns=[key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            done += 1
            nbytes = size * done // rows - size * (done - 1) // rows
            yield _text(value, f"{path} row {done}", key), nbytes


def _documents(inputs: Sequence[tuple[Path, str]], key: str) -> Iterator[tuple[str, int]]:
    for path, kind in inputs:
        yield from (_iter_jsonl if kind == "jsonl" else _iter_parquet)(path, key)


def _chunks(docs: Iterator[tuple[str, int]], n: int) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    nbytes = 0
    for text, size in docs:
        nbytes += size
        if text:
            texts.append(text)
        if len(texts) >= n:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts or nbytes:
        yield texts, nbytes


def encode_chunk(tok: Tokenizer, texts: Sequence[str], append_eod: bool, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(tokens concatenated, length per document) for the documents that tokenize to something."""
    ids = tok.encode_batch(texts) if texts else []
    if append_eod:
        ids = [d + [tok.eod_id] for d in ids if d]
    ids = [d for d in ids if d]
    lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
        raise DataError(f"the tokenizer produced id {int(flat.max())}, beyond its vocabulary; the tokenizer files "
                        "are inconsistent.")
    return flat.astype(dtype), lengths


_WORKER: dict = {}


def _worker_init(tokenizer_path: str, append_eod: bool, dtype_name: str) -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "sequence longer than model max length" is irrelevant here
    except ImportError:  # pragma: no cover
        pass
    _WORKER.update(tok=load_tokenizer(tokenizer_path), append_eod=append_eod, dtype=np.dtype(dtype_name).type)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_WORKER["tok"], texts, _WORKER["append_eod"], _WORKER["dtype"])


def _encoded(chunks: Iterator[tuple[list[str], int]], cfg: PrepareConfig, tok: Tokenizer, dtype: type
             ) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """(tokens, lengths, documents read, bytes read) per chunk, in input order. With workers > 1 a
    pool tokenizes while this process reads; at most 4 chunks per worker wait, bounding memory."""
    if cfg.workers <= 1:
        for texts, nbytes in chunks:
            flat, lengths = encode_chunk(tok, texts, cfg.append_eod, dtype)
            yield flat, lengths, len(texts), nbytes
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(cfg.workers, initializer=_worker_init,
                    initargs=(str(tok.path), cfg.append_eod, np.dtype(dtype).name))
    try:
        pending: deque = deque()
        for texts, nbytes in chunks:
            pending.append((pool.apply_async(_worker_encode, (texts,)), len(texts), nbytes))
            while len(pending) >= 4 * cfg.workers:
                result, n, b = pending.popleft()
                yield (*result.get(), n, b)
        while pending:
            result, n, b = pending.popleft()
            yield (*result.get(), n, b)
        pool.close()
        pool.join()
    finally:
        pool.terminate()


ProgressFn = Callable[[int, int, int], None]  # (bytes read, documents written, tokens written) since last call


def input_bytes(inputs: Sequence[PathLike]) -> int:
    return sum(Path(p).stat().st_size for p in inputs)


def prepare(cfg: PrepareConfig, progress: ProgressFn = lambda b, d, t: None) -> PrepareSummary:
    """Tokenize the inputs into `<out>.bin/.idx`, one document per record, in input order.

    Checks inputs, tokenizer and output before any work; builds under temporary names, so a failure
    midway leaves no output files."""
    start = time.perf_counter()
    if cfg.workers < 1:
        raise DataError(f"--workers must be at least 1, not {cfg.workers}.")
    inputs = check_inputs(cfg.inputs)
    prefix = os.fspath(cfg.out)
    check_output(prefix, cfg.overwrite)
    tok = load_tokenizer(cfg.tokenizer)
    if cfg.append_eod and tok.eod_id is None:
        raise DataError(f"the tokenizer in {cfg.tokenizer} has no end-of-document (EOS) token for --append-eod; "
                        "set eos_token in its tokenizer_config.json or drop --append-eod.")
    dtype = optimal_dtype(tok.vocab_size)
    skipped = 0
    stream = _encoded(_chunks(_documents(inputs, cfg.key), cfg.chunk_docs), cfg, tok, dtype)
    with IndexedDatasetWriter(prefix, dtype) as writer, closing(stream):
        for flat, lengths, n_docs, nbytes in stream:
            writer.add_documents(flat, lengths)
            skipped += n_docs - int(lengths.size)
            progress(nbytes, int(lengths.size), int(flat.size))
        if writer.num_documents == 0:
            raise DataError(f"no documents with text found in {', '.join(str(p) for p, _ in inputs)}; check --key.")
    return PrepareSummary(writer.num_documents, writer.num_tokens, skipped, time.perf_counter() - start,
                          np.dtype(dtype).name, tok.vocab_size, prefix)
