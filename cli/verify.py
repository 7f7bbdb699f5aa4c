"""`mzoo verify`: prove two checkpoints are the same model by their logits."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mzoo import validate as V
from mzoo.cli import options as O
from mzoo.cli.common import console, print_json, user_errors
from mzoo.tolerances import VERIFY_TOLERANCE as TOLERANCE


@user_errors
def verify(
    a: Path = typer.Argument(..., help="First checkpoint (any format, any layout)."),
    b: Path = typer.Argument(..., help="Second checkpoint."),
    batch: int = O.option(2, help="Sequences in the test batch.", rule=V.POSITIVE),
    seq_len: int = O.option(32, help="Tokens per sequence.", rule=V.POSITIVE),
    seed: int = O.option(0, help="Seed of the random token batch.", rule=V.NON_NEGATIVE),
    tolerance: float = O.option(TOLERANCE, help="Largest max |Δlogits| (fp32) that counts as a match.",
                                rule=V.FINITE_NON_NEGATIVE),
    trust_pickle: bool = O.TRUST_PICKLE,
    vocab_size: Optional[int] = O.VOCAB_SIZE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Compare every tensor of both checkpoints and their logits on the same tokens; exit 0 only if both match.

    Example: mzoo verify ./llama-hf ./llama-mcore-tp2pp2
    """
    from mzoo.jobs.verify import VerifyRequest, verify as run

    result = run(VerifyRequest(a, b, batch, seq_len, seed, tolerance, trust_pickle, vocab_size))
    if as_json:
        print_json(result.as_dict())
    else:
        verdict = "[green]match[/]" if result.match else "[red]MISMATCH[/]"
        console.print(f"max |Δlogits| {result.max_abs_diff:.3e} (tolerance {tolerance:g}), mean KL "
                      f"{result.mean_kl:.3e}, argmax agreement {result.argmax_agreement:.2%} over "
                      f"{result.tokens} tokens; max |Δ| {result.max_tensor_diff:.3e} over all {result.tensors} "
                      f"tensors" + (f" (worst: {result.worst_tensor})" if result.worst_tensor else "") + f": {verdict}",
                      highlight=False)
    if not result.match:
        raise typer.Exit(1)
