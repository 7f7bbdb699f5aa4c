"""`mzoo push`: parse, call mzoo.jobs.push, print."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from mzoo.cli import options as O
from mzoo.cli.common import console, err_console, print_json, quiet_transformers, user_errors
from mzoo.cli.progress import byte_progress

if TYPE_CHECKING:  # the jobs import torch: only a command that runs loads them
    from mzoo.jobs.push import PushResult


def _report(result: "PushResult", as_json: bool, quiet: bool) -> None:
    req, src, files, card, generated, commit = (result.request, result.source, result.files, result.card,
                                                result.card_generated, result.commit)
    staging = req.staging
    total = sum(f.bytes for f in files)
    where = f"{req.endpoint}/{req.repo_id}" + (f"/tree/{req.revision}" if req.revision != "main" else "")
    if as_json:
        print_json({"repo_id": req.repo_id, "revision": req.revision, "endpoint": req.endpoint, "url": where,
                    "private": req.private, "dry_run": req.dry_run,
                    "source": {"path": str(src.path), "format": src.fmt},
                    "files": [{"path": f.path, "bytes": f.bytes} for f in files], "total_bytes": total,
                    "card_generated": generated, "card": card, "staging": str(staging) if staging else None,
                    "commit": {"oid": commit.oid, "url": commit.url} if commit else None})
        return
    if quiet:
        return
    if commit is not None:
        console.print(f"pushed {len(files)} files ({total:,} bytes) to {where}: commit {commit.oid[:12]}",
                      markup=False, highlight=False)
        return
    console.print(f"dry run: {len(files)} files ({total:,} bytes) would be committed to {req.repo_id} "
                  f"(branch {req.revision}) at {req.endpoint}; nothing was uploaded", markup=False, highlight=False)
    width = max(len(f.path) for f in files)
    for f in files:
        console.print(f"  {f.path:<{width}}  {f.bytes:>15,}", markup=False, highlight=False)
    console.print(f"staging folder: {staging} (kept)" if staging else "staging folder: removed", markup=False,
                  highlight=False)
    note = "" if generated else " (the checkpoint's own, kept as is)"
    console.print(f"----- README.md{note} -----", markup=False, highlight=False)
    typer.echo(card.rstrip("\n"))


# ---- the command ----------------------------------------------------------------------------------------
CKPT = typer.Argument(..., help="Checkpoint to publish: Hugging Face, or Megatron torch/torch_dist/zarr in any "
                                "layout (converted to Hugging Face on the way).")
REPO = typer.Argument(..., metavar="ORG/NAME", help="Repository on the hub, created if missing.")
REVISION = typer.Option("main", "--revision", help="Branch to commit to; created (from main) if missing.")
PRIVATE = typer.Option(False, "--private", help="Create the repository private; an existing public one is "
                                                "refused rather than uploaded to.")
MESSAGE = typer.Option(None, "--commit-message", help="Commit title (default: 'Upload <family> model ...').")
TOKEN_ENV = typer.Option(None, "--token-env", metavar="VAR", help="Read the token from this environment variable "
                                                                  "instead of HF_TOKEN / the `hf auth login` file.")
DRY_RUN = typer.Option(False, "--dry-run", help="Build the staging folder, print its files and the model card, "
                                                "upload nothing (needs no token).")
STAGING = typer.Option(None, "--staging", metavar="DIR", help="Build the upload here and keep it (default: a "
                                                              "temporary folder, removed afterwards; see TMPDIR).")
ENDPOINT = typer.Option(None, "--endpoint", metavar="URL", help="Hub URL (default: HF_ENDPOINT or "
                                                                "https://huggingface.co).")
LICENSE = typer.Option(None, "--license", help="Hub license identifier for the card, e.g. apache-2.0, llama3.1, "
                                               "other (default: unknown).")
BASE = typer.Option(None, "--base-model", metavar="ORG/NAME", help="Model these weights derive from (default: "
                                                                   "what the checkpoint records, if anything).")
TOKENIZER = typer.Option(None, "--tokenizer", metavar="DIR", help="Publish this tokenizer folder with the model "
                                                                  "(default: the checkpoint's own tokenizer files).")
JSON = typer.Option(False, "--json", help="Print a JSON summary (files, card, commit) on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress or summary.")


@user_errors
def push(
    ckpt: Path = CKPT, repo_id: str = REPO, revision: str = REVISION, private: bool = PRIVATE,
    commit_message: Optional[str] = MESSAGE, token_env: Optional[str] = TOKEN_ENV, dry_run: bool = DRY_RUN,
    staging: Optional[Path] = STAGING, endpoint: Optional[str] = ENDPOINT, license: Optional[str] = LICENSE,
    base_model: Optional[str] = BASE, tokenizer: Optional[Path] = TOKENIZER, trust_pickle: bool = O.TRUST_PICKLE,
    vocab_size: Optional[int] = O.VOCAB_SIZE, as_json: bool = JSON, quiet: bool = QUIET,
) -> None:
    """Publish a checkpoint to the Hugging Face Hub as one commit, with a generated model card.

    Megatron checkpoints (any format, any layout) are converted to Hugging Face safetensors on the way.

    The token comes from --token-env VAR, HF_TOKEN or the `hf auth login` file; it is never printed.

    Example: mzoo push ./llama-mcore my-org/llama-tiny --revision v1 --private --license apache-2.0
    (look first: mzoo push ./llama-mcore my-org/llama-tiny --dry-run --staging ./upload)
    """
    from mzoo import hub
    from mzoo.jobs.push import PushEvents, PushRequest, push as run_push

    request = PushRequest(ckpt, repo_id, revision, endpoint, private, dry_run, license, base_model, commit_message,
                          staging, tokenizer, trust_pickle, vocab_size, token_env)
    quiet_transformers()
    show = not (quiet or as_json)

    def uploading(message: str) -> Any:
        if show and err_console.is_terminal:  # in logs stderr stays the one error sentence
            err_console.print(message, style="dim", markup=False, highlight=False)
        return hub.progress_bars(show)  # huggingface_hub's own bars: per LFS file, or Xet's

    def retrying(message: str) -> None:
        if not quiet:
            err_console.print(f"retrying: {message}", style="yellow", markup=False, highlight=False)

    events = PushEvents(progress=lambda total, label: byte_progress(total, label, not show),
                        status=lambda text: err_console.status(text) if show else nullcontext(),
                        retrying=retrying, uploading=uploading)
    _report(run_push(request, events), as_json, quiet)
