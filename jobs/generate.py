"""`mzoo generate`: load any checkpoint into an mzoo model and continue a prompt, streaming the text
piece by piece as tokens arrive (KV cache for attention, states for Mamba)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mzoo.capacity import require_memory
from mzoo.ckpt.integrity import is_finite, nonfinite_message
from mzoo.data.tokenizer import load_transformers_tokenizer
from mzoo.errors import UserError
from mzoo.generate import GenerationConfig, generate as run_generation, memory_needed
from mzoo.jobs.sources import Source, open_source, with_adapter
from mzoo.models import build_model
from mzoo.models.canonical import load_canonical
from mzoo.params import count_params, human


@dataclass(frozen=True)
class GenerateRequest:
    ckpt: Path
    prompt: Optional[str] = None  # text (needs a tokenizer), or
    prompt_ids: Optional[tuple[int, ...]] = None  # token ids
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tokenizer: Optional[Path] = None
    trust_pickle: bool = False
    adapter: Optional[Path] = None  # a peft LoRA adapter, merged into the weights


@dataclass
class GenerateResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    tokenizer: Any = None  # a transformers tokenizer when the checkpoint (or --tokenizer) has one

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_ids": self.prompt_ids, "generated_ids": self.generated_ids}
        if self.tokenizer is not None:
            out.update(prompt=self.tokenizer.decode(self.prompt_ids),
                       text=self.tokenizer.decode(self.generated_ids, skip_special_tokens=True))
        return out


def tokenizer_folder(ckpt: Path, src: Source, explicit: Optional[Path]) -> Optional[Path]:
    """--tokenizer, else the checkpoint's own tokenizer files, else a tokenizer.json beside it."""
    if explicit is not None:
        return explicit  # load_transformers_tokenizer says so in one sentence when it holds none
    if src.assets.has_tokenizer:
        return src.assets.tokenizer_dir
    for folder in (ckpt, ckpt.parent):
        if (folder / "tokenizer.json").exists():
            return folder
    return None


def _prompt_ids(req: GenerateRequest, tok: Any, vocab_size: int, context: int) -> list[int]:
    if req.prompt_ids is not None:
        ids = list(req.prompt_ids)
    else:
        if tok is None:
            raise UserError(f"{req.ckpt} has no tokenizer; pass --tokenizer DIR or use --prompt-ids.")
        ids = tok.encode(req.prompt, add_special_tokens=False)
        if not ids:
            raise UserError("the prompt encodes to no tokens; give some text.")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}).")
    if len(ids) >= context:
        raise UserError(f"the prompt has {len(ids)} tokens but the model's context is {context}; shorten the prompt.")
    return ids


def generate(req: GenerateRequest, on_text: Optional[Callable[[str], None]] = None) -> GenerateResult:
    """Continue the prompt; `on_text` receives what to show as it is produced: the prompt text first,
    then each new piece of decoded text (or, without a tokenizer, the ids, comma-separated)."""
    if (req.prompt is None) == (req.prompt_ids is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3.")
    gen = req.generation
    gen.validate()
    src = with_adapter(open_source(req.ckpt, req.trust_pickle), req.adapter)
    cfg = src.cfg
    folder = tokenizer_folder(req.ckpt, src, req.tokenizer)
    tok = load_transformers_tokenizer(folder) if folder is not None else None
    ids = _prompt_ids(req, tok, cfg.vocab_size, cfg.max_position_embeddings)
    if tok is not None and tok.eos_token_id is not None:
        gen.eos_token_id = tok.eos_token_id
    require_memory(memory_needed(cfg, len(ids), gen.max_new_tokens), torch.device("cpu"),
                   f"generating from {req.ckpt} ({human(count_params(cfg).total)} parameters in fp32, with its "
                   f"KV cache)", "check the sizes in its config (hidden_size, ffn_hidden_size, vocab_size, "
                   "num_layers) or run on a machine with more memory")
    model = build_model(cfg, dtype=torch.float32)

    def weight(name: str) -> torch.Tensor:
        value = src.get(name).float()
        if not is_finite(value):  # else every logit is NaN and greedy decoding prints token 0 forever
            raise UserError(nonfinite_message(name, src.path, "generate from an earlier or repaired checkpoint"))
        return value

    load_canonical(model, weight)
    made: list[int] = []
    # decode after the prompt text, so the first word keeps the space that separates it from the prompt
    context = ids if tok is not None and req.prompt is not None else []
    shown = tok.decode(context, skip_special_tokens=True) if context else ""

    def on_token(token: int) -> None:
        nonlocal shown
        made.append(token)
        if on_text is None:
            return
        if tok is None:
            on_text(("" if len(made) == 1 else ",") + str(token))
        else:
            text = tok.decode(context + made, skip_special_tokens=True)
            on_text(text[len(shown):])
            shown = text

    if on_text is not None and tok is not None and req.prompt is not None:
        on_text(req.prompt)
    out = run_generation(model, torch.tensor([ids]), gen, cfg.max_position_embeddings, on_token)
    return GenerateResult(ids, out, tok)
