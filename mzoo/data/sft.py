"""Supervised finetuning data: JSONL examples -> tokens with a loss mask -> packed samples.

Formats (one JSON object per line):
- text:              {"text": "..."}                            every token is trained
- prompt-completion: {"prompt": "...", "completion": "..."}     only completion tokens are trained
- chat:              {"messages": [{"role": ..., "content": ...}, ...]}
                     rendered with the tokenizer's chat template; only assistant turns are trained

Packing puts several examples into one sequence without letting them see each other: every token
carries its example's segment id (the model masks attention across segments) and positions
restart at 0 per example. A label is trained only when it is a trained token of the same example
as the token predicting it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mzoo.data.errors import DataError

FORMATS = ("text", "prompt-completion", "chat")
KEYS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "chat": ("messages",)}


@dataclass(frozen=True)
class Example:
    tokens: list[int]
    trained: list[bool]  # per token: does the model learn to produce it


def read_jsonl(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Every record, each checked for the keys its format needs; errors name file and line."""
    if fmt not in FORMATS:
        raise DataError(f"unknown --format '{fmt}'; use {', '.join(FORMATS)}.")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a JSONL file.")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number} is not valid JSON ({e.msg}); fix or remove that line.") from None
            _check(record, fmt, f"{path}:{number}")
            records.append(record)
    if not records:
        raise DataError(f"{path} holds no examples.")
    return records


def _check(record: Any, fmt: str, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where} must be a JSON object with {', '.join(KEYS[fmt])}.")
    for key in KEYS[fmt]:
        if key not in record:
            raise DataError(f"{where} lacks the key '{key}' that --format {fmt} needs.")
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings.")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where} has no assistant message, so nothing would be trained.")
    else:
        for key in KEYS[fmt]:
            if not isinstance(record[key], str):
                raise DataError(f"{where}: '{key}' must be a string.")


def tokenize(record: dict[str, Any], fmt: str, tokenizer) -> Example:
    """Tokens and their trained flags; an end-of-sequence token closes text and completions."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = tokenizer.encode(record["text"], add_special_tokens=False) + eos
        return Example(ids, [True] * len(ids))
    if fmt == "prompt-completion":
        prompt = tokenizer.encode(record["prompt"], add_special_tokens=False)
        completion = tokenizer.encode(record["completion"], add_special_tokens=False) + eos
        return Example(prompt + completion, [False] * len(prompt) + [True] * len(completion))
    return _chat(record["messages"], tokenizer)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


def _chat(messages: list[dict], tokenizer) -> Example:
    """Assistant tokens are those each assistant turn adds to the rendering of the turns before it
    (with the generation prompt): exact for any template that renders turns in order."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("--format chat needs a tokenizer with a chat template (tokenizer_config.json chat_template).")
    ids = _render(tokenizer, messages, False)
    trained = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], False))
        for j in range(start, min(end, len(ids))):
            trained[j] = True
    return Example(ids, trained)


@dataclass
class PackedSample:
    tokens: torch.Tensor  # [seq_len] inputs
    labels: torch.Tensor  # [seq_len] next tokens
    loss_mask: torch.Tensor  # [seq_len] float: 1 where the label is trained
    position_ids: torch.Tensor  # [seq_len] restart at 0 per example
    segments: torch.Tensor  # [seq_len] example id within the sample (padding: its own ids)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(tokens=self.tokens, labels=self.labels, loss_mask=self.loss_mask,
                    position_ids=self.position_ids, segments=self.segments)


def pack(examples: list[Example], seq_len: int, pad_id: int = 0, packing: bool = True) -> list[PackedSample]:
    """Greedy in-order packing into seq_len + 1 tokens (inputs and shifted labels); an example
    never spans two samples; longer examples are truncated. Without packing, one example each."""
    bins: list[list[Example]] = []
    used = 0
    for ex in examples:
        ex = Example(ex.tokens[: seq_len + 1], ex.trained[: seq_len + 1])
        if not bins or not packing or used + len(ex.tokens) > seq_len + 1:
            bins.append([])
            used = 0
        bins[-1].append(ex)
        used += len(ex.tokens)
    return [_sample(b, seq_len, pad_id) for b in bins]


def _sample(examples: list[Example], seq_len: int, pad_id: int) -> PackedSample:
    tokens, trained, segments, positions = [], [], [], []
    for seg, ex in enumerate(examples):
        tokens += ex.tokens
        trained += ex.trained
        segments += [seg] * len(ex.tokens)
        positions += list(range(len(ex.tokens)))
    pad = seq_len + 1 - len(tokens)
    first_pad = len(examples)
    tokens += [pad_id] * pad
    trained += [False] * pad
    segments += list(range(first_pad, first_pad + pad))  # padding attends to nothing real
    positions += [0] * pad
    t, seg = torch.tensor(tokens), torch.tensor(segments)
    mask = torch.tensor(trained[1:]) & (seg[1:] == seg[:-1])
    return PackedSample(t[:-1], t[1:], mask.float(), torch.tensor(positions[:-1]), seg[:-1])


def sampler(samples: list[PackedSample], seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """Global sample index -> sample, cycling through reshuffled epochs (seeded, layout-independent)."""
    n = len(samples)
    orders: dict[int, list[int]] = {}

    def get(index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(index, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch),
                                          device="cpu").tolist()
        return samples[orders[epoch][i]].as_dict()

    return get


@dataclass
class SFTConfig:
    data: Path
    fmt: str = "text"
    valid_data: Optional[Path] = None
    valid_fraction: float = 0.0
    packing: bool = True


def build(cfg: SFTConfig, tokenizer, seq_len: int, vocab_size: int, seed: int
          ) -> tuple[list[PackedSample], Optional[list[PackedSample]], dict[str, int]]:
    """(train samples, valid samples or None, statistics) from the JSONL file(s)."""
    records = read_jsonl(cfg.data, cfg.fmt)
    valid_records = read_jsonl(cfg.valid_data, cfg.fmt) if cfg.valid_data else None
    if valid_records is None and cfg.valid_fraction:
        if not 0 < cfg.valid_fraction < 1:
            raise DataError(f"--valid-fraction must be in (0, 1), got {cfg.valid_fraction}.")
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, int(len(records) * cfg.valid_fraction))
        if cut >= len(records):
            raise DataError(f"{cfg.data} has too few examples ({len(records)}) to split off a validation set.")
        valid_records = [records[i] for i in order[:cut]]
        records = [records[i] for i in order[cut:]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def make(recs: list[dict]) -> list[PackedSample]:
        examples = [tokenize(r, cfg.fmt, tokenizer) for r in recs]
        top = max((max(e.tokens, default=0) for e in examples), default=0)
        if top >= vocab_size:
            raise DataError(f"the tokenizer produced id {top}, beyond the model's vocabulary of {vocab_size}; "
                            "use the model's tokenizer.")
        return pack(examples, seq_len, pad, cfg.packing)

    train = make(records)
    valid = make(valid_records) if valid_records else None
    trained = int(sum(s.loss_mask.sum() for s in train))
    if not trained:
        raise DataError(f"{cfg.data} trains no tokens at --seq-len {seq_len} (completions truncated away?).")
    stats = {"examples": len(records), "samples": len(train), "trained_tokens": trained,
             "valid_samples": len(valid) if valid else 0}
    return train, valid, stats
