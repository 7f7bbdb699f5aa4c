"""`mzoo data prepare`: JSONL / parquet documents -> tokens -> an indexed dataset, in input order,
tokenized by a pool of workers while this process reads and writes.

The output equals Megatron-LM's tools/preprocess_data.py (HuggingFaceTokenizer, one JSON key, no
sentence splitting) byte for byte: every record is one document of one sequence; a record whose text
tokenizes to nothing stays a document with no sequence (Megatron's `add_document([], [])`), so document
counts agree; --append-eod adds the EOS id to non-empty documents only; the tokenizer's own special
tokens (a BOS) are added unless --tokenizer-hf-no-include-special-tokens. A blank JSONL line is no
record (preprocess_data.py stops there with a JSON error)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import sys
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from mzoo.data.errors import DataError
from mzoo.ckpt.atomic import check_space, disk_full
from mzoo.data.indexed import IndexedDatasetWriter, PathLike, bin_path, idx_path, optimal_dtype, pending_path
from mzoo.data.tokenizer import Tokenizer, load_tokenizer
from mzoo.signals import worker_defaults, workers_forked

INPUT_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass
class PrepareConfig:
    inputs: list[Path]
    tokenizer: Path
    out: str  # prefix: writes <out>.bin and <out>.idx
    key: str = "text"
    workers: int = 1
    append_eod: bool = False
    include_special_tokens: bool = True  # the tokenizer's BOS etc., as Megatron-LM's default now
    overwrite: bool = False
    chunk_docs: int = 256  # documents per task sent to a worker


@dataclass
class PrepareSummary:
    documents: int
    sequences: int
    tokens: int
    empty: int  # documents that tokenized to nothing: kept, with no sequence, as Megatron keeps them
    seconds: float
    dtype: str
    vocab_size: int
    prefix: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"documents": self.documents, "sequences": self.sequences, "tokens": self.tokens,
                "empty": self.empty,
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


def sweep_temporaries(prefix: str) -> list[Path]:
    """Remove the unlocked temporaries a killed `data prepare` left beside PREFIX.bin/.idx, and say so;
    the pending-pair marker stays until a new pair replaces the mismatched one."""
    from mzoo.ckpt.atomic import leftovers, remove

    gone = [p for p in [*leftovers(bin_path(prefix)), *leftovers(idx_path(prefix))] if p != pending_path(prefix)]
    for path in gone:
        remove(path)
    if gone:
        sys.stderr.write(f"note: removed {len(gone)} temporary file(s) an interrupted run left beside {prefix}: "
                         f"{', '.join(p.name for p in gone)}\n")
    return gone


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where} has a '{key}' that is {type(value).__name__}, not text; fix the record or pass "
                        "--key with the field that holds the text.")
    return value


Record = tuple[Optional[str], int]  # (text, or None for a line that is no record; its bytes)


def _iter_jsonl(path: Path, key: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield None, len(line)  # a blank line is no document; still count the bytes
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise DataError(f"{path}:{lineno} is not valid JSON ({msg}); fix or remove that line.") from None
            if not isinstance(record, dict) or key not in record:
                raise DataError(f"{path}:{lineno} has no '{key}' field; pass --key with the field that holds the text.")
            yield _text(record[key], f"{path}:{lineno}", key), len(line)


def _iter_parquet(path: Path, key: str) -> Iterator[Record]:
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


def _documents(inputs: Sequence[tuple[Path, str]], key: str) -> Iterator[Record]:
    for path, kind in inputs:
        yield from (_iter_jsonl if kind == "jsonl" else _iter_parquet)(path, key)


def _chunks(docs: Iterator[Record], n: int) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    nbytes = 0
    for text, size in docs:
        nbytes += size
        if text is not None:  # an empty text is still a document
            texts.append(text)
        if len(texts) >= n:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts or nbytes:
        yield texts, nbytes


def encode_chunk(tok: Tokenizer, texts: Sequence[str], append_eod: bool, dtype: type,
                 special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens concatenated, length per document; 0 for one that tokenizes to nothing, which gets no
    EOD either, as in preprocess_data.py)."""
    ids = [_encode_long(tok, t, special_tokens) if len(t) > PIECE_CHARS else None for t in texts]
    short = [t for t, d in zip(texts, ids) if d is None]
    done = iter(tok.encode_batch(short, special_tokens) if short else [])
    ids = [next(done) if d is None else d for d in ids]
    if append_eod:
        ids = [d + [tok.eod_id] if d else d for d in ids]
    lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
        raise DataError(f"the tokenizer produced id {int(flat.max())}, beyond its vocabulary; the tokenizer files "
                        "are inconsistent.")
    return flat.astype(dtype), lengths


PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of about this many characters
_PIECE_START = re.compile(r"(?<=\S)\s")  # the start of a whitespace run


def split_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut just before the first whitespace run starting at or after every `size` characters.
    A run of `size` characters without whitespace stays in one piece."""
    pieces, start = [], 0
    while len(text) - start > size:
        m = _PIECE_START.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def _encode_long(tok: Tokenizer, text: str, special_tokens: bool, size: int = PIECE_CHARS) -> list[int]:
    """The ids of one long document, tokenized piece by piece so memory stays bounded (one 50 MB line
    took data prepare to 4.8 GB: the tokenizer holds offsets and token strings for every token).

    Pieces are cut just before a whitespace run, where the pre-tokenizers of GPT-2 / Llama-3 style
    byte-level BPE, Metaspace (SentencePiece-converted) and Whitespace always split, so no token
    crosses a cut and the ids equal tokenizing the whole text. A tokenizer without such a split (a
    raw SentencePiece model, a Prepend normalizer) may tokenize a cut differently: at most a token or
    two per PIECE_CHARS characters. The special tokens (a BOS, an EOS) are the tokenizer's own: the
    first piece is encoded with and without them, and what it added goes around the whole."""
    pieces = split_pieces(text, size)
    plain = [tok.encode(p, False) for p in pieces[:1]]
    if not special_tokens:
        return plain[0] + [i for p in pieces[1:] for i in tok.encode(p, False)]
    first = tok.encode(pieces[0], True)
    n = len(plain[0])
    at = next((i for i in range(len(first) - n + 1) if first[i:i + n] == plain[0]), None)
    if at is None:  # the special tokens are not around the text: the tokenizer's own way, whole
        return tok.encode(text, True)
    rest = [i for p in pieces[1:] for i in tok.encode(p, False)]
    return first[:at + n] + rest + first[at + n:]


_WORKER: dict = {}


def _worker_init(tokenizer_path: str, append_eod: bool, special_tokens: bool, dtype_name: str) -> None:
    worker_defaults()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "sequence longer than model max length" is irrelevant here
    except ImportError:  # pragma: no cover
        pass
    _WORKER.update(tok=load_tokenizer(tokenizer_path), append_eod=append_eod, special_tokens=special_tokens,
                   dtype=np.dtype(dtype_name).type)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    w = _WORKER
    return encode_chunk(w["tok"], texts, w["append_eod"], w["dtype"], w["special_tokens"])


def _encoded(chunks: Iterator[tuple[list[str], int]], cfg: PrepareConfig, tok: Tokenizer, dtype: type
             ) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """(tokens, lengths, documents read, bytes read) per chunk, in input order. With workers > 1 a
    pool tokenizes while this process reads; at most 4 chunks per worker wait, bounding memory."""
    if cfg.workers <= 1:
        for texts, nbytes in chunks:
            flat, lengths = encode_chunk(tok, texts, cfg.append_eod, dtype, cfg.include_special_tokens)
            yield flat, lengths, len(texts), nbytes
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with workers_forked():  # the pool's helper threads inherit the mask, so do workers they restart
        pool = ctx.Pool(cfg.workers, initializer=_worker_init,
                        initargs=(str(tok.path), cfg.append_eod, cfg.include_special_tokens,
                                  np.dtype(dtype).name))
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
    check_space(Path(prefix).absolute().parent, input_bytes(cfg.inputs), f"writing {prefix}.bin/.idx")
    sweep_temporaries(prefix)
    tok = load_tokenizer(cfg.tokenizer)
    if cfg.append_eod and tok.eod_id is None:
        raise DataError(f"the tokenizer in {cfg.tokenizer} has no end-of-document (EOS) token for --append-eod; "
                        "set eos_token in its tokenizer_config.json or drop --append-eod.")
    dtype = optimal_dtype(tok.vocab_size)
    empty = 0
    stream = _encoded(_chunks(_documents(inputs, cfg.key), cfg.chunk_docs), cfg, tok, dtype)
    try:
        with IndexedDatasetWriter(prefix, dtype) as writer, closing(stream):
            for flat, lengths, n_docs, nbytes in stream:
                nonempty = lengths > 0  # an empty document is a document with no sequence, as in Megatron
                writer.add_documents(flat, lengths[nonempty], nonempty.astype(np.int64))
                empty += n_docs - int(np.count_nonzero(nonempty))
                progress(nbytes, n_docs, int(flat.size))
            if writer.num_tokens == 0:
                n = writer.num_documents
                detail = f"{n} documents, none with a token" if n else "no records"
                files = ", ".join(str(p) for p, _ in inputs)
                raise DataError(f"no documents with text found in {files} ({detail}); check --key.")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        if pending_path(prefix).exists():  # between the two renames: readers refuse the pair until rerun
            raise DataError(f"the disk filled while writing {prefix}.bin/.idx, between its two renames (the new "
                            f".bin is in, the old .idx still there, and readers refuse the pair): free some space "
                            f"and re-run `mzoo data prepare --overwrite`.") from None
        raise disk_full(Path(f"{prefix}.bin")) from None
    return PrepareSummary(writer.num_documents, writer.num_sequences, writer.num_tokens, empty,
                          time.perf_counter() - start, np.dtype(dtype).name, tok.vocab_size, prefix)
