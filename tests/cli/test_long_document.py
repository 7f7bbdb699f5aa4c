"""Issue 17, case 10: one huge JSONL line must not take `mzoo data prepare` to gigabytes.

A long document is tokenized in pieces cut before whitespace runs (mzoo.data.prepare._encode_long);
the ids equal tokenizing it whole for the tokenizers data preparation is tested with, special tokens
included, and the command stays under an address-space cap that the whole-text tokenization broke."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mzoo.data.prepare import _encode_long, split_pieces
from mzoo.data.tokenizer import load_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven tiny models learn".split()
EOD = "<|endoftext|>"


def _text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    seps = rng.choice([" ", "  ", "\n", " \t "], n_words)
    return "".join(w + s for w, s in zip(rng.choice(WORDS, n_words), seps))


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    """Whitespace BPE (file and transformers folder), and a byte-level BPE whose post-processor adds a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("toks")
    corpus = [_text(30, s) for s in range(200)]
    ws = Tokenizer(models.BPE(unk_token="<unk>"))
    ws.pre_tokenizer = pre_tokenizers.Whitespace()
    ws.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", EOD]))
    ws.save(str(root / "ws.json"))
    PreTrainedTokenizerFast(tokenizer_object=ws, eos_token=EOD, unk_token="<unk>").save_pretrained(root / "ws-hf")
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", EOD],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bl.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=bl, bos_token="<s>", eos_token=EOD).save_pretrained(root / "bl-hf")
    return {"ws": root / "ws.json", "ws-hf": root / "ws-hf", "bl-hf": root / "bl-hf"}


def test_pieces_cut_before_whitespace_and_rejoin():
    text = _text(5000)
    pieces = split_pieces(text, 500)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert all(p[0].isspace() for p in pieces[1:]) and all(not p[-1].isspace() for p in pieces[:-1])
    assert split_pieces("x" * 3000, 500) == ["x" * 3000]  # no whitespace: one piece


@pytest.mark.parametrize("name", ["ws", "ws-hf", "bl-hf"])
@pytest.mark.parametrize("special", [True, False])
def test_piecewise_ids_equal_whole_text(toks, name, special):
    tok = load_tokenizer(toks[name])
    text = _text(20000, seed=3)
    whole = tok.encode(text, special)
    assert _encode_long(tok, text, special, size=700) == whole
    if name == "bl-hf" and special:
        assert whole[0] == 0  # the BOS is there once, at the start


def test_one_huge_line_stays_under_an_address_space_cap(toks, tmp_path):
    """A 12 MB line under a 1.25 GiB cap: tokenized whole, the tokenizer failed to allocate (peak ~1 GB RSS,
    now ~270 MB)."""
    text = _text(2_000_000, seed=5)
    assert len(text) > 10**7
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n")
    cap = int(1.25 * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    run = "import sys; from mzoo.cli.main import app; sys.argv[0] = 'mzoo'; app()"
    proc = subprocess.run([sys.executable, "-c", run, "data", "prepare", str(src), "--tokenizer", str(toks["ws"]),
                           "--out", str(tmp_path / "out"), "-q"], preexec_fn=limit, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mzoo.data.indexed import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out"))
    tok = load_tokenizer(toks["ws"])
    head = split_pieces(text)[0]
    assert len(ds) == 1 and list(ds[0][:50]) == tok.encode(head, True)[:50]
