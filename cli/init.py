"""`mzoo init`: a randomly initialised checkpoint of any preset, in Hugging Face format."""

from __future__ import annotations

from pathlib import Path

import typer

from mzoo import validate as V
from mzoo.cli import options as O
from mzoo.cli.common import console, print_json, user_errors
from mzoo.params import human


@user_errors
def init(
    preset: str = typer.Argument(..., help="Zoo preset name or a model YAML file."),
    out: Path = typer.Argument(..., help="Folder to create (must not exist)."),
    seed: int = O.option(0, help="Random seed; the same seed gives the same weights.", rule=V.NON_NEGATIVE),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 500MB."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Write a randomly initialised model that AutoModelForCausalLM.from_pretrained loads.

    Example: mzoo init llama-tiny ./tiny-llama --seed 1
    """
    from mzoo.jobs.init import InitRequest, init as run

    result = run(InitRequest(preset, out, seed, dtype, shard_size, overwrite))
    if as_json:
        print_json(result.as_dict())
    else:
        console.print(f"wrote {result.preset or preset} ({human(result.params)} parameters, {dtype}, seed {seed}) to {out}",
                      markup=False)
