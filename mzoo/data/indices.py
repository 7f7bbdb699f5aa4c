"""Index construction, as megatron-core's GPTDataset / BlendedDataset / helpers.cpp do it.

Document / sample / shuffle indices come from the same `numpy.random.RandomState(seed)` calls and
blends from the same greedy arithmetic, so for the same prefix, split, sequence length, seed and
sample count a GPT dataset yields the same sample at the same index as Megatron's GPTDataset.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np

from mzoo.data.errors import DataError

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
    doc = np.searchsorted(starts, positions, side="right") - 1  # skips zero-length documents, as helpers.cpp
    doc[0] = 0  # ... except before the first sample: helpers.cpp starts at (0, 0) even on an empty document
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
