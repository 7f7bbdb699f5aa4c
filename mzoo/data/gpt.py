"""GPT datasets: samples of seq_len + 1 tokens over one indexed dataset, blends, mock data, and the
builder of the train / valid / test splits (Megatron's BlendedMegatronDatasetBuilder).

A training run addresses data only by global sample index (the consumed-samples counter), so it
resumes at the same place whatever its data-parallel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mzoo.data.cache import CACHE_FORMAT, cached_indices, default_cache_dir
from mzoo.data.errors import DataError
from mzoo.data.indexed import IndexedDataset, PathLike, bin_path, idx_path
from mzoo.data.indices import (SPLITS, build_blending_indices, build_document_index,
                               build_exhaustive_blending_indices, build_sample_index, build_shuffle_index,
                               num_epochs_for, parse_split, split_range)
from mzoo.data.tokenizer import check_tokenizer_fits, load_tokenizer

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
        if len(self.indices) == 0:
            raise DataError(
                f"the {split} split of {dataset.prefix} is empty: its share in --split gives it none of the "
                f"{len(dataset)} documents; pass a larger {split} share (e.g. --split 90,10,0 for valid) or "
                "evaluate less (no --eval-interval).")
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


def build_gpt_datasets(cfg: DataConfig, num_samples: Sequence[Optional[int]] = (None, None, None),
                       wanted: Sequence[bool] = (True, True, True)) -> list[Optional[Dataset]]:
    """[train, valid, test] datasets, like Megatron's BlendedMegatronDatasetBuilder with GPTDataset.

    `num_samples[i]` is how many samples split i must provide (None: one epoch). A split whose share
    is zero, or that is not `wanted` (no evaluation asked: a small corpus may leave it empty), is None.
    With weights, each split is a BlendedDataset of about num_samples[i] samples."""
    if cfg.mock:
        if not cfg.vocab_size:
            raise DataError("mock data needs the model's vocabulary size.")
        return [MockGPTDataset(cfg.vocab_size, cfg.seq_len, cfg.seed + i, n) for i, n in enumerate(num_samples)]
    if not cfg.prefixes:
        raise DataError("no data given; pass dataset prefixes written by `mzoo data prepare`, or use --mock-data.")
    if cfg.weights is not None and len(cfg.weights) != len(cfg.prefixes):
        raise DataError(f"{len(cfg.weights)} weights for {len(cfg.prefixes)} datasets; give one weight per prefix.")
    bookends = [b if want else None for b, want in zip(parse_split(cfg.split), wanted)]
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
