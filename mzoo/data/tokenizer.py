"""Tokenizers from a local folder (never the network), and the check that one fits a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mzoo.data.errors import DataError
from mzoo.data.indexed import PathLike

_HF_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")


@dataclass
class Tokenizer:
    """What data preparation needs from a tokenizer, whichever library loaded it.

    `encode` adds the tokenizer's own special tokens (a Llama tokenizer's BOS) unless told not to, as
    megatron-core 0.19's HuggingFaceTokenizer does by default (include_special_tokens; 0.16's did
    not); `eod_id` is what --append-eod appends: the EOS token, else the SEP token, as Megatron's."""

    path: Path
    backend: Any  # a transformers tokenizer or a tokenizers.Tokenizer
    vocab_size: int
    eod_id: Optional[int]

    @property
    def is_transformers(self) -> bool:
        return not type(self.backend).__module__.startswith("tokenizers")

    def encode_batch(self, texts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        if self.is_transformers:
            out = self.backend(list(texts), add_special_tokens=special_tokens, return_attention_mask=False,
                               return_token_type_ids=False)
            return list(out["input_ids"])
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=special_tokens)]

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], special_tokens)[0]


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
    eod = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id  # Megatron's eod
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


def load_transformers_tokenizer(folder: PathLike) -> Any:
    """The transformers tokenizer saved in `folder`, as generation and chat templates need it (decode,
    eos, apply_chat_template); one sentence when there is none or it does not load."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise DataError(f"{folder} holds no tokenizer (tokenizer.json or tokenizer_config.json); pass --tokenizer DIR.")
    try:
        if (folder / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(folder))
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"the tokenizer in {folder} does not load ({reason.rstrip('.')}).") from None
