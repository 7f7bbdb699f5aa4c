"""`mzoo generate`: sample from any checkpoint (any format, any layout) with an inference cache."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mzoo import validate as V
from mzoo.cli import options as O
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


@user_errors
def generate(
    ckpt: Path = typer.Argument(..., help="Checkpoint (Hugging Face or Megatron, any layout)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (needs a tokenizer)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Prompt as token ids: 1,2,3."),
    max_new_tokens: int = O.option(32, "--max-new-tokens", help="Tokens to generate at most.", rule=V.POSITIVE),
    temperature: float = O.option(0.0, help="0 is greedy; above 0 samples.", rule=V.FINITE_NON_NEGATIVE),
    top_p: float = O.option(1.0, "--top-p", help="Nucleus sampling: smallest set of tokens reaching this mass.",
                            rule=V.PROBABILITY),
    seed: int = O.option(0, help="Seed of the sampler.", rule=V.NON_NEGATIVE),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the checkpoint's)."),
    trust_pickle: bool = O.TRUST_PICKLE,
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A peft LoRA adapter folder to apply (merged into "
                                           "the weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print prompt ids, generated ids and text as JSON."),
) -> None:
    """Generate text (streamed) or token ids from a checkpoint; KV cache for attention, states for Mamba.

    Example: mzoo generate ./llama-hf --prompt "Once upon a time" --max-new-tokens 40
    """
    from mzoo.generate import GenerationConfig
    from mzoo.jobs.generate import GenerateRequest, generate as run

    ids = tuple(_parse_ids(prompt_ids)) if prompt_ids is not None else None
    request = GenerateRequest(ckpt, prompt, ids, GenerationConfig(max_new_tokens, temperature, top_p, seed),
                              tokenizer, trust_pickle, adapter)
    quiet_transformers()

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run(request, None if as_json else show)
    if as_json:
        print_json(result.as_dict())
    else:
        sys.stdout.write("\n")
