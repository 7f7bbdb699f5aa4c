"""A small byte-level BPE tokenizer trained on the spot (demo, tests): no download needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

EOD = "<|endoftext|>"
CORPUS = Path(__file__).parent / "corpus" / "tiny_stories.jsonl"


def corpus_texts(path: Path = CORPUS, key: str = "text") -> list[str]:
    return [json.loads(line)[key] for line in path.read_text().splitlines() if line.strip()]


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Path:
    """Train a byte-level BPE of exactly `vocab_size` ids (EOD included) and save a folder that
    transformers' AutoTokenizer loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD, bos_token=EOD, unk_token=EOD)
    fast.save_pretrained(str(out))
    return Path(out)
