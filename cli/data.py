"""`mzoo data prepare`: tokenize text into Megatron's indexed dataset format (.bin + .idx)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from mzoo.cli.common import console, err_console, print_json, quiet_transformers, user_errors

app = typer.Typer(help="Prepare training data: tokenize corpora into Megatron indexed datasets.", no_args_is_help=True)


@app.command("prepare")
@user_errors
def prepare(
    inputs: List[Path] = typer.Argument(..., help="Input files: .jsonl (one JSON object per line) or .parquet."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer folder (save_pretrained) or tokenizer.json."),
    out: str = typer.Option(..., "--out", "-o", help="Output prefix: writes PREFIX.bin and PREFIX.idx."),
    key: str = typer.Option("text", help="JSON field / parquet column that holds the text."),
    workers: int = typer.Option(1, "--workers", "-w", help="Tokenizer processes (order is preserved)."),
    append_eod: bool = typer.Option(False, "--append-eod", help="Append the end-of-document token to every document."),
    overwrite: bool = typer.Option(False, help="Replace PREFIX.bin/.idx if they exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Tokenize documents into PREFIX.bin/.idx, which mzoo train and Megatron-LM read as --data-path.

    Example: mzoo data prepare corpus.jsonl --tokenizer ./llama3-tokenizer --out data/corpus --workers 8 --append-eod
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from mzoo.data.prepare import PrepareConfig, check_inputs, input_bytes, prepare as run_prepare

    quiet_transformers()
    cfg = PrepareConfig(inputs=list(inputs), tokenizer=tokenizer, out=out, key=key, workers=workers,
                        append_eod=append_eod, overwrite=overwrite)
    check_inputs(cfg.inputs)  # before the bar: a missing file is one sentence, not a broken bar
    if quiet or as_json:
        summary = run_prepare(cfg)
    else:
        counts = {"docs": 0, "tokens": 0}
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task("tokenizing", total=input_bytes(cfg.inputs))

            def tick(nbytes: int, docs: int, tokens: int) -> None:
                counts["docs"] += docs
                counts["tokens"] += tokens
                bar.update(task, advance=nbytes,
                           description=f"tokenizing: {counts['docs']:,} docs, {counts['tokens']:,} tokens")

            summary = run_prepare(cfg, tick)
    if as_json:
        print_json(summary.as_dict())
    else:
        console.print(f"{summary.documents:,} documents, {summary.tokens:,} tokens ({summary.dtype}) in "
                      f"{summary.seconds:.2f} s ({summary.tokens_per_s:,.0f} tokens/s) -> {summary.prefix}.bin/.idx",
                      highlight=False)
