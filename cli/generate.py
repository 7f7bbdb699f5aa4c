"""`mzoo generate`: sample from any checkpoint (any format, any layout) with an inference cache."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mzoo.cli.common import print_json, quiet_transformers, user_errors
from mzoo.errors import UserError


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers like 1,2,3, got '{text}'.") from None
    if not ids:
        raise UserError("--prompt-ids is empty; give at least one token id.")
    return ids


def _tokenizer_folder(ckpt: Path, src, explicit: Optional[Path]) -> Optional[Path]:
    if explicit is not None:
        return explicit  # load_tokenizer says so in one sentence when it holds none
    if src.tokenizer_files:
        return Path(src.tokenizer_files[0]).parent
    for folder in (ckpt, ckpt.parent):
        if (folder / "tokenizer.json").exists():
            return folder
    return None


def load_tokenizer(folder: Path):
    """The tokenizer saved in `folder`; one sentence when there is none or it does not load."""
    quiet_transformers()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise UserError(f"{folder} holds no tokenizer (tokenizer.json or tokenizer_config.json); pass --tokenizer DIR.")
    try:
        if (folder / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(folder))
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the tokenizer in {folder} does not load ({reason.rstrip('.')}).") from None


@user_errors
def generate(
    ckpt: Path = typer.Argument(..., help="Checkpoint (Hugging Face or Megatron, any layout)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (needs a tokenizer)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Prompt as token ids: 1,2,3."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest set of tokens reaching this mass."),
    seed: int = typer.Option(0, help="Seed of the sampler."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the checkpoint's)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Unpickle objects outside mzoo's allowlist."),
    as_json: bool = typer.Option(False, "--json", help="Print prompt ids, generated ids and text as JSON."),
) -> None:
    """Generate text (streamed) or token ids from a checkpoint; KV cache for attention, states for Mamba.

    Example: mzoo generate ./llama-hf --prompt "Once upon a time" --max-new-tokens 40
    """
    import torch

    from mzoo.converters.hf import load_canonical
    from mzoo.converters.pipeline import open_source
    from mzoo.generate import GenerationConfig, generate as run
    from mzoo.models import build_model

    if (prompt is None) == (prompt_ids is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3.")
    gen = GenerationConfig(max_new_tokens, temperature, top_p, seed)
    gen.validate()
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    src = open_source(ckpt, trust_pickle)
    cfg = src.cfg
    folder = _tokenizer_folder(ckpt, src, tokenizer)
    tok = load_tokenizer(folder) if folder is not None else None
    if ids is None:
        if tok is None:
            raise UserError(f"{ckpt} has no tokenizer; pass --tokenizer DIR or use --prompt-ids.")
        ids = tok.encode(prompt, add_special_tokens=False)
        if not ids:
            raise UserError("the prompt encodes to no tokens; give some text.")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1}).")
    if len(ids) >= cfg.max_position_embeddings:
        raise UserError(f"the prompt has {len(ids)} tokens but the model's context is "
                        f"{cfg.max_position_embeddings}; shorten the prompt.")
    if tok is not None and tok.eos_token_id is not None:
        gen.eos_token_id = tok.eos_token_id
    model = build_model(cfg, dtype=torch.float32)
    load_canonical(model, lambda name: src.get(name).float())
    stream = not as_json
    made: list[int] = []
    # decode after the prompt text, so the first word keeps the space that separates it from the prompt
    context = ids if tok is not None and prompt is not None else []
    shown = tok.decode(context, skip_special_tokens=True) if context else ""

    def on_token(token: int) -> None:
        nonlocal shown
        made.append(token)
        if not stream:
            return
        if tok is None:
            sys.stdout.write(("" if len(made) == 1 else ",") + str(token))
        else:
            text = tok.decode(context + made, skip_special_tokens=True)
            sys.stdout.write(text[len(shown):])
            shown = text
        sys.stdout.flush()

    if stream and tok is not None and prompt is not None:
        sys.stdout.write(prompt)
    out = run(model, torch.tensor([ids]), gen, cfg.max_position_embeddings, on_token)
    if as_json:
        result = {"prompt_ids": ids, "generated_ids": out}
        if tok is not None:
            result.update(prompt=tok.decode(ids), text=tok.decode(out, skip_special_tokens=True))
        print_json(result)
    else:
        sys.stdout.write("\n")
