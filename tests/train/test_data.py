"""Training data: `mzoo data prepare` writes what REAL megatron-core reads (and the reverse), the GPT
dataset yields the same samples as megatron-core's GPTDataset / BlendedDataset, and the global
sample assignment makes data independent of the data-parallel size.

megatron-core's dataset code runs on a CPU build as is (no torch.cuda call on these paths), so no
shim is installed here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mzoo.data.gpt import DataConfig, MockGPTDataset, build_gpt_datasets, parse_blend
from mzoo.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from mzoo.data.indices import build_blending_indices, build_sample_index, parse_split
from mzoo.data.samplers import global_sample_indices
from mzoo.data.tokenizer import check_tokenizer_fits, load_tokenizer
from mzoo.errors import UserError

EOD = "<|endoftext|>"
WORDS = ("the quick brown fox jumps over a lazy dog while seven tiny models learn to predict "
         "tokens from megatron style indexed datasets and every sample is contiguous").split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 40)))) for _ in range(n)]


def _jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A small BPE tokenizer trained here: (transformers folder, tokenizer.json file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(200, 99), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", EOD]))
    tok.save(str(root / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD, unk_token="<unk>")
    hf.save_pretrained(root / "hf")
    return root / "hf", root / "tokenizer.json"


def mzoo(*args):
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def _expected(tok_file: Path, texts: list[str], eod: bool) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    ids = [e.ids for e in tok.encode_batch(texts)]
    return [d + [tok.token_to_id(EOD)] for d in ids] if eod else ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok_dirs):
    """Two prepared datasets (with EOD) and their documents."""
    hf, tok_file = tok_dirs
    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for name, n, seed in (("a", 160, 1), ("b", 90, 2)):
        texts = _texts(n, seed)
        r = mzoo("data", "prepare", _jsonl(root / f"{name}.jsonl", texts), "--tokenizer", hf, "--out",
                 root / name, "--append-eod", "--json")
        assert r.exit_code == 0, r.stderr
        out[name] = (str(root / name), _expected(tok_file, texts, True), json.loads(r.stdout))
    return out


# ---------------------------------------------------------------------------------------------- format


def test_prepare_output_reads_in_megatron_core(tmp_path, tok_dirs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    hf, tok_file = tok_dirs
    texts = _texts(120, 3)
    part1, part2 = _jsonl(tmp_path / "p1.jsonl", texts[:70]), _jsonl(tmp_path / "p2.jsonl", texts[70:])
    r = mzoo("data", "prepare", part1, part2, "--tokenizer", hf, "--out", tmp_path / "c", "--append-eod",
             "--workers", "2")
    assert r.exit_code == 0, r.stderr
    assert "120 documents" in r.stdout and "tokens/s" in r.stdout and "uint16" in r.stdout
    expected = _expected(tok_file, texts, eod=True)
    meg = MegatronIndexed(str(tmp_path / "c"))
    assert meg.index.dtype == np.uint16 and len(meg) == 120
    assert [meg[i].tolist() for i in range(len(meg))] == expected
    assert meg.document_indices.tolist() == list(range(121))
    ours = IndexedDataset(tmp_path / "c")
    assert [ours[i].tolist() for i in range(len(ours))] == expected
    # order is preserved whatever the worker count and tokenizer library: byte-identical files
    r = mzoo("data", "prepare", part1, part2, "--tokenizer", tok_file, "--out", tmp_path / "d", "--append-eod", "-q")
    assert r.exit_code == 0, r.stderr
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"c{ext}").read_bytes() == (tmp_path / f"d{ext}").read_bytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_builder_output_reads_in_mzoo_and_writers_agree(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 60000, int(rng.integers(0, 9))) for _ in range(int(rng.integers(1, 4)))]
            for _ in range(40)]
    builder = IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=dtype)
    with IndexedDatasetWriter(tmp_path / "ours", dtype) as writer:
        for seqs in docs:
            flat = np.concatenate(seqs)
            builder.add_document(torch.from_numpy(flat), [len(s) for s in seqs])
            writer.add_document(flat, [len(s) for s in seqs])
    builder.finalize(str(tmp_path / "meg.idx"))
    for ext in (".bin", ".idx"):  # the writers agree byte for byte
        assert (tmp_path / f"meg{ext}").read_bytes() == (tmp_path / f"ours{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "meg")
    assert ds.dtype == dtype and ds.num_documents == 40 and not ds.multimodal
    seqs = [s for d in docs for s in d]
    assert [ds[i].tolist() for i in range(len(ds))] == [s.tolist() for s in seqs]
    assert [ds.document(i).tolist() for i in range(40)] == [np.concatenate(d).tolist() for d in docs]
    assert ds.get(3, offset=1, length=2).tolist() == seqs[3][1:3].tolist()


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory) -> Path:
    """A transformers tokenizer folder whose post-processor adds a BOS, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bos")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", EOD, "<s>"])
    tok.train_from_iterator(_texts(200, 98), trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=EOD, unk_token="<unk>")
    hf.save_pretrained(root)
    return root


def _preprocess_data(jsonl: Path, tokenizer: Path, prefix: Path, append_eod: bool,
                     special_tokens: bool) -> int:
    """Megatron-LM's tools/preprocess_data.py (one key, no sentence splitting) as a reference: megatron-core's
    own HuggingFaceTokenizer and IndexedDatasetBuilder, one add_document per JSON line, the document empty
    (no sequence) when its text tokenizes to nothing, the EOD only on a non-empty one. Returns the records.
    preprocess_data.py stops on a blank line (json.loads fails); the reference passes over it as mzoo does."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(str(tokenizer), include_special_tokens=special_tokens)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    for record in records:
        ids = tok.text_to_ids(record["text"])
        ids = ids + [tok.eod] if ids and append_eod else ids
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)] if ids else [])
    builder.finalize(f"{prefix}.idx")
    return len(records)


@pytest.mark.parametrize("append_eod, special_tokens, workers",
                         [(True, True, 2), (False, True, 1), (True, False, 1), (False, False, 2)])
def test_prepare_equals_preprocess_data_with_empty_documents(tmp_path, bos_tok, append_eod, special_tokens,
                                                             workers):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    texts = _texts(300, 7)
    for i in (0, 5, 100, 101, 299):  # first, consecutive and last documents empty
        texts[i] = ""
    texts[7] = "   "  # tokenizes to nothing (no BOS: an empty document too)
    lines = _jsonl(tmp_path / "c.jsonl", texts).read_text().splitlines(keepends=True)
    (tmp_path / "c.jsonl").write_text("".join(lines[:50] + ["\n"] + lines[50:]))  # a blank line is no record
    flags = ["--append-eod"] if append_eod else []
    flags += [] if special_tokens else ["--tokenizer-hf-no-include-special-tokens"]
    r = mzoo("data", "prepare", tmp_path / "c.jsonl", "--tokenizer", bos_tok, "--out", tmp_path / "ours",
             "--workers", workers, "--json", *flags)
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    records = _preprocess_data(tmp_path / "c.jsonl", bos_tok, tmp_path / "meg", append_eod, special_tokens)
    assert records == 300
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"meg{ext}").read_bytes(), ext
    meg, ours = MegatronIndexed(str(tmp_path / "meg")), IndexedDataset(tmp_path / "ours")
    n_empty = 0 if special_tokens else 6
    assert len(meg.document_indices) - 1 == ours.num_documents == summary["documents"] == 300
    assert len(meg) == len(ours) == summary["sequences"] == 300 - n_empty and summary["empty"] == n_empty
    tok = load_tokenizer(bos_tok)
    bos, eod = tok.backend.bos_token_id, [tok.eod_id] if append_eod else []
    assert ours.document(0).tolist() == ([bos] + eod if special_tokens else [])  # the empty text
    assert (ours.document(1)[0] == bos) == special_tokens


def test_parquet_input(tmp_path, tok_dirs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    hf, tok_file = tok_dirs
    texts = _texts(2500, 6)
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), tmp_path / "c.parquet", row_group_size=700)
    r = mzoo("data", "prepare", tmp_path / "c.parquet", "--tokenizer", hf, "--out", tmp_path / "c", "--key", "body")
    assert r.exit_code == 0, r.stderr
    ds = IndexedDataset(tmp_path / "c")
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(tok_file, texts, eod=False)
    r = mzoo("data", "prepare", tmp_path / "c.parquet", "--tokenizer", hf, "--out", tmp_path / "d")
    assert r.exit_code == 2 and "no 'text' column" in r.stderr


def test_multimodal_modes_read(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.int32, multimodal=True)
    for i in range(5):
        builder.add_item(torch.arange(i + 1), mode=i % 2)
        builder.end_document()
    builder.finalize(str(tmp_path / "mm.idx"))
    ds = IndexedDataset(tmp_path / "mm")
    assert ds.multimodal and ds.sequence_modes.tolist() == [0, 1, 0, 1, 0]
    assert ds[4].tolist() == [0, 1, 2, 3, 4]


def test_dtype_rule_matches_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    for v in (256, 32000, 65499, 65500, 128256, None):
        assert optimal_dtype(v) is DType.optimal_dtype(v)
    assert optimal_dtype(300) is np.uint16 and optimal_dtype(65500) is np.int32


def test_truncated_files_are_reported(tmp_path, corpus):
    prefix = corpus["a"][0]
    for ext, cut in ((".bin", 10), (".idx", 5)):
        data = Path(prefix + ext).read_bytes()
        (tmp_path / "t.bin").write_bytes(Path(prefix + ".bin").read_bytes())
        (tmp_path / "t.idx").write_bytes(Path(prefix + ".idx").read_bytes())
        (tmp_path / f"t{ext}").write_bytes(data[:-cut])
        with pytest.raises(UserError, match="truncated"):
            IndexedDataset(tmp_path / "t")
    with pytest.raises(UserError, match="missing"):
        IndexedDataset(tmp_path / "nope")
    assert IndexedDataset(prefix + ".bin").prefix == prefix  # the common slip of naming a file


def test_parse_blend():
    assert parse_blend(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["a"]) == (["a"], None)


# ---------------------------------------------------------------------------------------------- GPT dataset


def test_samples_are_contiguous_documents_with_eod(tmp_path, corpus, tok_dirs):
    prefix, docs, summary = corpus["a"]
    assert summary["documents"] == len(docs) and summary["dtype"] == "uint16"
    eod = load_tokenizer(tok_dirs[0]).eod_id
    seq = 16
    train, valid, test = build_gpt_datasets(
        DataConfig([prefix], split="90,10", seq_len=seq, seed=5, cache_dir=tmp_path), [None, None, None])
    assert test is None
    for ds in (train, valid):
        stream = np.concatenate([docs[d] for d in ds.document_index])  # documents in shuffled order
        assert stream[-1] == eod and np.count_nonzero(stream == eod) == len(ds.document_index)
        unshuffled = np.argsort(ds.shuffle_index)
        assert len(ds) == (len(stream) - 1) // seq
        for j in range(len(ds)):
            s = ds[int(unshuffled[j])]
            window = stream[j * seq: j * seq + seq + 1]
            assert s["tokens"].dtype == torch.int64 and s["tokens"].shape == (seq,)
            assert s["tokens"].tolist() == window[:-1].tolist() and s["labels"].tolist() == window[1:].tolist()


def test_same_samples_as_megatron_gpt_dataset(tmp_path, corpus):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class Tok:  # what GPTDatasetConfig reads from a tokenizer on this path
        vocab_size, eod, unique_identifiers = 256, 1, {"class": "Tok"}

    a, b = corpus["a"][0], corpus["b"][0]
    cases = [([a], None, [700, 30, 0]),  # one dataset, several epochs
             ([a, b], [0.3, 0.7], [300, 20, 0])]  # weighted blend
    for prefixes, weights, sizes in cases:
        cfg = GPTDatasetConfig(random_seed=11, sequence_length=12, blend=(prefixes, weights), split="95,5,0",
                               tokenizer=Tok(), reset_position_ids=False, reset_attention_mask=False,
                               eod_mask_loss=False, create_attention_mask=False,
                               path_to_cache=str(tmp_path / "meg") if weights is None else None)
        theirs = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()
        ours = build_gpt_datasets(DataConfig(prefixes, weights, split="95,5,0", seq_len=12, seed=11,
                                                 cache_dir=tmp_path / "ours"), sizes)
        for t, o in zip(theirs[:2], ours[:2]):
            assert len(t) == len(o)
            for i in range(len(t)):
                assert torch.equal(t[i]["tokens"], o[i]["tokens"]) and torch.equal(t[i]["labels"], o[i]["labels"])


def test_empty_documents_and_zero_length_sequences_give_megatrons_samples(tmp_path):
    """Empty documents (preprocess_data's, no sequence) and zero-length sequences (another builder's) in
    one dataset: the same splits, indices and samples as megatron-core's GPTDataset, no crash."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    class Tok:
        vocab_size, eod, unique_identifiers = 256, 1, {"class": "Tok"}

    rng = np.random.default_rng(4)
    builder = IndexedDatasetBuilder(str(tmp_path / "z.bin"), dtype=np.uint16)
    for d in range(240):
        if d % 5 == 0:
            builder.add_document(torch.zeros(0, dtype=torch.int64), [])  # an empty document
        elif d % 5 == 1:
            builder.add_item(torch.zeros(0, dtype=torch.int64))  # a zero-length sequence
            builder.end_document()
        else:
            n = int(rng.integers(1, 20))
            builder.add_document(torch.from_numpy(rng.integers(2, 256, n)), [n])
    builder.finalize(str(tmp_path / "z.idx"))
    prefix = str(tmp_path / "z")
    assert IndexedDataset(prefix).num_documents == 240 and len(IndexedDataset(prefix)) == 192
    for sizes in ([None, None, None], [500, 40, 0]):
        cfg = GPTDatasetConfig(random_seed=3, sequence_length=9, blend=([prefix], None), split="90,10,0",
                               tokenizer=Tok(), reset_position_ids=False, reset_attention_mask=False,
                               eod_mask_loss=False, create_attention_mask=False, path_to_cache=None)
        theirs = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()
        ours = build_gpt_datasets(DataConfig([prefix], split="90,10,0", seq_len=9, seed=3,
                                             cache_dir=tmp_path / f"ours{sizes[0]}"), sizes)
        for t, o in zip(theirs[:2], ours[:2]):
            assert np.array_equal(t.sample_index, o.sample_index)
            assert np.array_equal(t.document_index, o.document_index)
            assert len(t) == len(o) > 0
            for i in range(len(t)):
                assert torch.equal(t[i]["tokens"], o[i]["tokens"]) and torch.equal(t[i]["labels"], o[i]["labels"])


def test_sample_index_matches_megatron_helpers():
    from megatron.core.datasets import helpers

    rng = np.random.default_rng(1)
    for seq, epochs in ((7, 1), (16, 3), (64, 2)):
        sizes = rng.integers(1, 50, 100).astype(np.int32)
        doc_index = np.tile(np.arange(100, dtype=np.int32), epochs)
        rng.shuffle(doc_index)
        sizes[rng.random(100) < 0.2] = 0  # zero-length sequences (another builder's add_item of nothing) ...
        sizes[doc_index[0]] = 0  # ... also the very first: helpers.cpp still starts sample 0 there
        tokens = int(sizes.sum())
        theirs = helpers.build_sample_idx(sizes, doc_index, seq, epochs, tokens, True, True)
        ours = build_sample_index(sizes, doc_index, seq, epochs, tokens)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_shuffle_is_deterministic_and_cache_is_reused(tmp_path, corpus):
    prefix = corpus["a"][0]

    def build(seed: int):
        return build_gpt_datasets(DataConfig([prefix], split="1", seq_len=8, seed=seed,
                                                 cache_dir=tmp_path), [500, None, None])[0]

    first = build(3)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert not first.cache_hit and len(files) == 4  # document/sample/shuffle indices + description
    assert not any(".mzoo-tmp" in p.name for p in files)
    again = build(3)
    assert again.cache_hit and {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files
    assert isinstance(again.shuffle_index, np.memmap)
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(len(first)))
    other = build(4)
    assert not other.cache_hit and len(list(tmp_path.iterdir())) == 8
    assert not np.array_equal(np.asarray(other.shuffle_index), np.asarray(first.shuffle_index))
    # default cache location: next to the data
    ds = build_gpt_datasets(DataConfig([prefix], split="1", seq_len=8, seed=3), [None, None, None])[0]
    assert not ds.cache_hit and any(Path(prefix + ".cache").glob("GPTDataset-train-*-shuffle_index.npy"))


def test_blend_follows_weights(tmp_path, corpus):
    (a, docs_a, _), (b, docs_b, _) = corpus["a"], corpus["b"]
    ds = build_gpt_datasets(DataConfig([a, b], [1, 3], split="1", seq_len=8, seed=0, cache_dir=tmp_path),
                              [400, None, None])[0]
    assert len(ds) == 400
    for k in (1, 10, 57, 400):  # the mix is exact at every prefix of the stream
        assert abs(np.count_nonzero(ds.dataset_index[:k] == 0) - 0.25 * k) <= 1
    streams = [np.concatenate([docs[d] for d in part.document_index]).astype(np.int64).tobytes()
               for docs, part in zip((docs_a, docs_b), ds.datasets)]  # each corpus in its shuffled order
    for i in range(0, 400, 7):  # each sample is a window of the corpus the blend index names
        own = int(ds.dataset_index[i])
        window = ds.tokens(i).tobytes()
        assert window in streams[own] and window not in streams[1 - own]
    assert build_blending_indices([0.5, 0.5], 6)[0].tolist() == [0, 1, 0, 1, 0, 1]
    # without weights: in proportion to the datasets' sizes, every sample once
    exhaustive = build_gpt_datasets(DataConfig([a, b], split="1", seq_len=8, seed=0, cache_dir=tmp_path),
                                      [None, None, None])[0]
    sizes = [len(p) for p in exhaustive.datasets]
    assert len(exhaustive) == sum(sizes)
    assert np.bincount(exhaustive.dataset_index).tolist() == sizes


def test_split_ranges_are_disjoint(tmp_path, corpus):
    prefix, docs, _ = corpus["a"]
    assert parse_split("98,2") == [(0.0, 0.98), (0.98, 1.0), None]
    train, valid, test = build_gpt_datasets(
        DataConfig([prefix], split="80,15,5", seq_len=8, seed=0, cache_dir=tmp_path), [None, None, None])
    ranges = [set(np.asarray(ds.document_index).tolist()) for ds in (train, valid, test)]
    assert not (ranges[0] & ranges[1]) and not (ranges[0] & ranges[2]) and not (ranges[1] & ranges[2])
    assert set.union(*ranges) == set(range(len(docs)))
    assert ranges[1] == set(range(128, 152))  # round(.80 * 160) .. round(.95 * 160)


def test_mock_dataset():
    train = build_gpt_datasets(DataConfig(mock=True, vocab_size=100, seq_len=10, seed=3), [8, None, None])[0]
    assert len(train) == 8
    s = train[5]
    assert s["tokens"].shape == (10,) and s["tokens"].dtype == torch.int64 and int(s["tokens"].max()) < 100
    assert torch.equal(s["labels"][:-1], s["tokens"][1:])
    assert torch.equal(MockGPTDataset(100, 10, 3)[5]["tokens"], s["tokens"])
    assert not torch.equal(train[4]["tokens"], s["tokens"])


# ---------------------------------------------------------------------------------------------- global samples


def _run(dp: int, micro: int, global_batch: int, start: int, steps: int) -> list[int]:
    """Global sample indices consumed, in order (micro-step major, then DP rank), over `steps`."""
    seen = []
    for step in range(steps):
        consumed = start + step * global_batch
        per_rank = [global_sample_indices(consumed, global_batch, r, dp, micro) for r in range(dp)]
        for m in range(len(per_rank[0])):
            for r in range(dp):
                seen += per_rank[r][m]
    return seen


def test_global_samples_do_not_depend_on_dp_size(corpus):
    assert _run(1, 2, 8, 0, 3) == _run(2, 2, 8, 0, 3) == _run(4, 1, 8, 0, 3) == list(range(24))
    assert global_sample_indices(16, 8, 1, 2, 2) == [[18, 19], [22, 23]]
    # stop after 2 steps at DP=2, resume at DP=4 (or DP=1): the same stream as one uninterrupted run
    full = _run(1, 2, 8, 0, 5)
    assert _run(2, 2, 8, 0, 2) + _run(4, 1, 8, 16, 3) == full
    assert _run(2, 2, 8, 0, 2) + _run(1, 4, 8, 16, 3) == full
    # and the samples themselves are the same tensors
    ds = build_gpt_datasets(DataConfig([corpus["a"][0]], split="1", seq_len=8, seed=1), [None] * 3)[0]
    batches = global_sample_indices(8, 8, 0, 1, 4)  # micro-batches stacked as the trainer stacks them
    dp1 = torch.cat([torch.stack([ds[i]["tokens"] for i in mb]) for mb in batches])
    per_rank = [global_sample_indices(8, 8, r, 2, 2) for r in range(2)]
    dp2 = [torch.stack([ds[i]["tokens"] for i in per_rank[r][m]]) for m in range(2) for r in range(2)]
    assert torch.equal(dp1, torch.cat(dp2))
    with pytest.raises(UserError, match="not a multiple"):
        global_sample_indices(0, 10, 0, 2, 2)


# ---------------------------------------------------------------------------------------------- errors


def _one_sentence(text: str) -> str:
    msg = " ".join(text.split())
    assert "Traceback" not in text and msg.startswith("error:") and msg.endswith("."), text
    assert msg.count(". ") <= 1, msg
    return msg


def test_errors_are_one_sentence_and_leave_nothing(tmp_path, tok_dirs):
    hf = tok_dirs[0]
    good = _jsonl(tmp_path / "good.jsonl", _texts(600, 4))
    out = tmp_path / "out"
    out.mkdir()
    r = mzoo("data", "prepare", tmp_path / "missing.jsonl", "--tokenizer", hf, "--out", out / "c")
    assert r.exit_code == 2 and "missing.jsonl does not exist" in _one_sentence(r.stderr)
    empty = tmp_path / "empty-tok"
    empty.mkdir()
    r = mzoo("data", "prepare", good, "--tokenizer", empty, "--out", out / "c")
    assert r.exit_code == 2 and "has no tokenizer" in _one_sentence(r.stderr)
    # fails midway: the second file breaks after the first was tokenized (by two workers)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n{not json\n")
    r = mzoo("data", "prepare", good, bad, "--tokenizer", hf, "--out", out / "c", "--workers", "2")
    assert r.exit_code == 2 and "bad.jsonl:2 is not valid JSON" in _one_sentence(r.stderr)
    wrong_key = _jsonl(tmp_path / "k.jsonl", ["a b"], key="content")
    r = mzoo("data", "prepare", wrong_key, "--tokenizer", hf, "--out", out / "c")
    assert r.exit_code == 2 and "--key" in _one_sentence(r.stderr)
    only_empty = _jsonl(tmp_path / "e.jsonl", ["", "  "])  # documents, but not one token to train on
    r = mzoo("data", "prepare", only_empty, "--tokenizer", hf, "--out", out / "c", "--workers", "2")
    assert r.exit_code == 2 and "2 documents, none with a token" in _one_sentence(r.stderr)
    assert list(out.iterdir()) == []  # no .bin/.idx, no temporary files
    r = mzoo("data", "prepare", good, "--tokenizer", hf, "--out", tmp_path / "nodir" / "c")
    assert r.exit_code == 2 and "does not exist" in _one_sentence(r.stderr)
    # an existing output is kept unless --overwrite
    assert mzoo("data", "prepare", good, "--tokenizer", hf, "--out", out / "c", "-q").exit_code == 0
    r = mzoo("data", "prepare", good, "--tokenizer", hf, "--out", out / "c")
    assert r.exit_code == 2 and "--overwrite" in _one_sentence(r.stderr)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        r = mzoo("data", "prepare", tmp_path / "x.parquet", "--tokenizer", hf, "--out", out / "p")
        assert r.exit_code == 2 and "pip install pyarrow" in _one_sentence(r.stderr)



FAIL_MIDWAY = """
import sys
from pathlib import Path
from mzoo.data.errors import DataError
from mzoo.data.prepare import PrepareConfig, prepare
from mzoo.signals import install
install()  # what every mzoo command runs first: SIGTERM raises Stopped
good, bad, tok, out, n = sys.argv[1:]
for i in range(int(n)):
    try:
        prepare(PrepareConfig(inputs=[Path(good), Path(bad)], tokenizer=Path(tok), out=f"{out}{i}", workers=2))
    except DataError:
        continue
    raise SystemExit("the broken input was accepted")
print("ended", n)
"""


def test_a_run_that_fails_midway_always_ends_its_workers(tmp_path, tok_dirs):
    """Pool.terminate() after a midway failure, 20 times: workers forked with mzoo's own SIGTERM
    handler could survive the pool's SIGTERM (Python ran the handler where its exception was lost),
    and terminate then waited for them forever; a CI run hung here. Workers now take SIGTERM's
    default action."""
    import os
    import signal
    import subprocess
    import sys

    good = _jsonl(tmp_path / "good.jsonl", _texts(600, 4))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n{not json\n")
    proc = subprocess.Popen([sys.executable, "-c", FAIL_MIDWAY, str(good), str(bad), str(tok_dirs[0]),
                             str(tmp_path / "out"), "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung workers too
        proc.communicate()
        pytest.fail("prepare hung in Pool.terminate() after a midway failure")
    assert proc.returncode == 0 and out.split() == ["ended", "20"], err
    assert not any(tmp_path.glob("out*")), "a failed run left files"

def test_tokenizer_loading_and_vocab_check(tok_dirs):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf, tok_file = tok_dirs
    n = Tokenizer.from_file(str(tok_file)).get_vocab_size()
    assert 50 < n < 300
    for source in (hf, tok_file, tok_file.parent):  # transformers folder, tokenizer.json, folder with only it
        tok = load_tokenizer(source)
        assert tok.vocab_size == n and tok.eod_id == 1
        assert tok.encode("the lazy dog") == Tokenizer.from_file(str(tok_file)).encode("the lazy dog").ids
        check_tokenizer_fits(tok, n)
    with pytest.raises(UserError) as e:
        check_tokenizer_fits(AutoTokenizer.from_pretrained(hf, local_files_only=True), 40)
    assert str(e.value) == (f"the tokenizer has {n} tokens but the model's vocab_size is 40; use the tokenizer the "
                            f"model was built for or a model with vocab_size >= {n}.")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(hf / "nope")
