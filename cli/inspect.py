"""`mzoo inspect`: what a checkpoint is, without loading its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mzoo.cli.common import console, print_json, user_errors
from mzoo.params import count_params, human


def describe(path: Path, trust_pickle: bool = False, vocab_size: Optional[int] = None) -> dict:
    from mzoo.ckpt.sidecar import read_sidecar
    from mzoo.converters.pipeline import open_source

    src = open_source(path, trust_pickle, vocab_size)
    lay = src.layout
    root = path if src.fmt == "hf" or (path / "mzoo.yaml").exists() else path.parent
    side = read_sidecar(root) or {}
    problems = []
    recorded = side.get("files") or {}
    base = src.path if src.fmt == "hf" else root
    for rel, size in recorded.items():
        f = base / rel
        if not f.exists():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, mzoo.yaml recorded {size}")
    count = count_params(src.cfg)
    return {
        "path": str(path),
        "format": src.fmt,
        "iteration": src.iteration if src.fmt != "hf" else None,
        "tp": lay.tp if lay else 1,
        "pp": lay.pp if lay else 1,
        "vpp": lay.vpp if lay else 1,
        "spec": lay.spec if lay else None,
        "dtype": str(src.dtype).replace("torch.", ""),
        "num_params": count.total,
        "active_params": count.active,
        "vocab_size": src.cfg.vocab_size,
        "total_bytes": sum(src.files.values()),
        "files": src.files,
        "written_by_mzoo": bool(side),
        "problems": problems,
        "model": src.cfg.to_dict(),
    }


@user_errors
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint folder (Hugging Face or Megatron, any format)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Unpickle objects outside mzoo's allowlist."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="True vocabulary size if unrecorded."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show format, model, layout, dtype, parameter count and files of a checkpoint.

    Example: mzoo inspect ./llama-mcore --json
    """
    info = describe(path, trust_pickle, vocab_size)
    if as_json:
        print_json(info)
        return
    m = info["model"]
    console.print(f"[bold]{path}[/]: {info['format']}"
                  + (f", iteration {info['iteration']}" if info["iteration"] is not None else ""), highlight=False)
    console.print(f"  model   {m['family']}: {human(info['num_params'])} parameters, {m['num_layers']} layers, "
                  f"hidden {m['hidden_size']}, vocab {info['vocab_size']}", highlight=False)
    console.print(f"  layout  tp={info['tp']} pp={info['pp']} vpp={info['vpp']}"
                  + (f" spec={info['spec']}" if info["spec"] else "") + f", dtype {info['dtype']}", highlight=False)
    console.print(f"  files   {len(info['files'])} files, {info['total_bytes'] / 1e9:.3f} GB", highlight=False)
    for p in info["problems"]:
        console.print(f"  [red]problem[/] {p}", highlight=False)
