"""`mzoo init`: a randomly initialised checkpoint of any preset, in Hugging Face format."""

from __future__ import annotations

from pathlib import Path

import typer

from mzoo.cli.common import console, print_json, user_errors
from mzoo.params import count_params, human
from mzoo.zoo import resolve


@user_errors
def init(
    preset: str = typer.Argument(..., help="Zoo preset name or a model YAML file."),
    out: Path = typer.Argument(..., help="Folder to create (must not exist)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same weights."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 500MB."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Write a randomly initialised model that AutoModelForCausalLM.from_pretrained loads.

    Example: mzoo init llama-tiny ./tiny-llama --seed 1
    """
    from mzoo.ckpt.atomic import check_destination
    from mzoo.ckpt.hf import parse_dtype, parse_size
    from mzoo.converters import for_family
    from mzoo.models.canonical import random_canonical
    from mzoo.converters.hf import save_hf
    cfg = resolve(preset)
    torch_dtype = parse_dtype(dtype)
    max_bytes = parse_size(shard_size)
    for_family(cfg.family).config_to_hf(cfg)  # fail before any work if HF cannot express it
    check_destination(out, overwrite)
    save_hf(cfg, random_canonical(cfg, seed), out, dtype=torch_dtype, max_shard_bytes=max_bytes, overwrite=overwrite)
    n = count_params(cfg).total
    if as_json:
        print_json({"path": str(out), "preset": cfg.name, "params": n, "dtype": dtype, "seed": seed})
    else:
        console.print(f"wrote {cfg.name or preset} ({human(n)} parameters, {dtype}, seed {seed}) to {out}")
