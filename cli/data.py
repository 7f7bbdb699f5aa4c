"""`mzoo data prepare`: tokenize text into Megatron's indexed dataset format (.bin + .idx)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from mzoo import validate as V
from mzoo.cli import options as O
from mzoo.cli.common import console, err_console, print_json, quiet_transformers, user_errors

app = typer.Typer(help="Prepare training data: tokenize corpora into Megatron indexed datasets.", no_args_is_help=True)


@app.command("prepare")
@user_errors
def prepare(
    inputs: List[Path] = typer.Argument(..., help="Input files: .jsonl (one JSON object per line) or .parquet."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer folder (save_pretrained) or tokenizer.json."),
    out: str = typer.Option(..., "--out", "-o", help="Output prefix: writes PREFIX.bin and PREFIX.idx."),
    key: str = typer.Option("text", help="JSON field / parquet column that holds the text."),
    workers: int = O.option(1, "--workers", "-w", help="Tokenizer processes (order is preserved).", rule=V.POSITIVE),
    append_eod: bool = typer.Option(
        False, "--append-eod", help="Append the end-of-document (EOS) token to every non-empty document."),
    special_tokens: bool = typer.Option(
        True, "--tokenizer-hf-include-special-tokens/--tokenizer-hf-no-include-special-tokens",
        help="Add the tokenizer's own special tokens (a Llama tokenizer's BOS), as Megatron-LM's "
             "preprocess_data.py does by default with megatron-core 0.19; megatron-core 0.16's tokenizer "
             "added them only with --tokenizer-hf-include-special-tokens."),
    overwrite: bool = typer.Option(False, help="Replace PREFIX.bin/.idx if they exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Tokenize documents into PREFIX.bin/.idx, which mzoo train and Megatron-LM read as --data-path.

    Byte for byte what Megatron-LM's tools/preprocess_data.py writes with the same tokenizer and
    switches: one document per record; a record whose text is empty is kept, as a document with no
    tokens (a blank line is no record).

    Example: mzoo data prepare corpus.jsonl --tokenizer ./llama3-tokenizer --out data/corpus --workers 8 --append-eod
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from mzoo.data.prepare import PrepareConfig, check_inputs, input_bytes, prepare as run_prepare

    quiet_transformers()
    cfg = PrepareConfig(inputs=list(inputs), tokenizer=tokenizer, out=out, key=key, workers=workers,
                        append_eod=append_eod, include_special_tokens=special_tokens, overwrite=overwrite)
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
        empty = f" ({summary.empty:,} empty)" if summary.empty else ""
        console.print(f"{summary.documents:,} documents{empty}, {summary.tokens:,} tokens ({summary.dtype}) "
                      f"in {summary.seconds:.2f} s ({summary.tokens_per_s:,.0f} tokens/s) -> {summary.prefix}.bin/.idx",
                      highlight=False, markup=False)
