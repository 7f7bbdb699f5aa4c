"""`mzoo push`: publish any checkpoint mzoo reads to a Hugging Face Hub, as one commit.

Order: every input check (repo id, branch, endpoint, license, token, checkpoint completeness,
conversion feasibility, disk space), then the hub (token, repository, branch), then the staging
folder (a streaming conversion to Hugging Face format, or links to an HF source, plus README.md),
then one commit. A failure anywhere removes the temporary staging folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from mzoo.cli.common import console, err_console, print_json, quiet_transformers, user_errors
from mzoo.cli.progress import byte_progress
from mzoo.errors import UserError
from mzoo.hub import RetryPolicy, UploadFile

RETRY = RetryPolicy()  # tests shorten the waits
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Request:
    """The validated command line: nothing here has touched the network or the disk yet."""

    repo_id: str
    revision: str
    endpoint: str
    private: bool
    dry_run: bool
    license: str
    base_model: Optional[str]
    message: Optional[str]
    staging: Optional[Path]


# ---- checks -------------------------------------------------------------------------------------------
def _check_staging(staging: Optional[Path]) -> None:
    if staging is None:
        return
    if staging.exists():
        raise UserError(f"--staging {staging} already exists; pass a new folder (mzoo creates it and keeps it).")
    if not staging.parent.is_dir():
        raise UserError(f"--staging {staging}: the parent folder {staging.parent} does not exist; create it first.")


def open_complete(ckpt: Path, trust_pickle: bool, vocab_size: Optional[int]):
    """The checkpoint as a Source, refused when it is incomplete or disagrees with its mzoo.yaml."""
    from mzoo.converters.pipeline import Target, describe, open_source, validate_target

    info = describe(ckpt, trust_pickle, vocab_size)  # raises on missing/truncated files it can see itself
    problems = info["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{ckpt} is incomplete or damaged: {problems[0]}{more}; copy or save it again "
                        "(`mzoo inspect` lists every problem).")
    src = open_source(ckpt, trust_pickle, vocab_size)
    if src.fmt != "hf":
        validate_target(src, Target("hf"))  # a family without an HF adapter fails here, before any work
    return src


def _tokenizer(src, tokenizer: Optional[Path]) -> list[Path]:
    """Tokenizer files to publish: --tokenizer DIR, else the source's own (HF folder or Megatron root)."""
    from mzoo.ckpt.hf import TOKENIZER_FILES
    from mzoo.converters.card import checkpoint_root

    if tokenizer is not None:
        found = [tokenizer / f for f in TOKENIZER_FILES if (tokenizer / f).is_file()]
        if not tokenizer.is_dir() or not any(f.name in TOKENIZER_MARKERS for f in found):
            raise UserError(f"--tokenizer {tokenizer} holds no tokenizer.json, tokenizer.model or vocab.json; pass "
                            "a folder saved with tokenizer.save_pretrained().")
        return found
    if src.tokenizer_files:
        return list(src.tokenizer_files)
    root, _ = checkpoint_root(src.path, src.fmt)
    return [root / f for f in TOKENIZER_FILES if (root / f).is_file()]


def _check_tokenizer(files: list[Path], vocab_size: int) -> None:
    """A tokenizer with ids beyond the model's vocabulary would make a repository that fails at the
    first generate; tokenizer.json says its largest id without loading anything."""
    path = next((f for f in files if f.name == "tokenizer.json"), None)
    if path is None:
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON; pass a tokenizer saved with save_pretrained().") from None
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id", 0) for t in data.get("added_tokens") or []]
    size = max((i for i in ids if isinstance(i, int)), default=-1) + 1
    if size > vocab_size:
        raise UserError(f"the tokenizer in {path.parent} has ids up to {size - 1} but the model's vocabulary has "
                        f"{vocab_size} rows; pass the tokenizer the model was trained with (--tokenizer DIR).")


def _check_space(src, parent: Path, tokenizer_files: list[Path]) -> None:
    """The staging folder must fit: a converted model needs its bytes, an HF source only when it
    cannot be hard-linked (another file system)."""
    need = sum(f.stat().st_size for f in tokenizer_files)
    if src.fmt != "hf":
        need += src.nbytes
    elif os.stat(src.path).st_dev != os.stat(parent).st_dev:
        need += sum(src.files.values())
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UserError(f"the staging folder needs {need / 1e9:.2f} GB but {parent} has {free / 1e9:.2f} GB free; "
                        "pass --staging on a larger disk (or set TMPDIR).")


# ---- staging --------------------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(src, dst: Path, tokenizer_files: list[Path], tick: Callable[[int], None]) -> None:
    """The folder to upload, built atomically: an HF source linked (or copied) file by file, any
    other source converted to HF by the streaming pipeline."""
    from mzoo.ckpt.atomic import atomic_dir
    from mzoo.converters.pipeline import Target, convert

    if src.fmt != "hf":
        src.tokenizer_files = tokenizer_files  # save_hf copies them next to config.json
        convert(src, dst, Target("hf"), progress=tick)
        return
    with atomic_dir(dst) as tmp:
        for rel, size in src.files.items():
            if not any(part.startswith(".") or ".mzoo-tmp" in part for part in Path(rel).parts):
                _link_or_copy(src.path / rel, tmp / rel)
                tick(size)
        for f in tokenizer_files:  # --tokenizer replaces the folder's own files of the same name
            if (tmp / f.name).exists() and not (tmp / f.name).samefile(f):
                (tmp / f.name).unlink()
            if not (tmp / f.name).exists():
                _link_or_copy(f, tmp / f.name)


def write_card(src, dst: Path, req: Request) -> tuple[str, bool]:
    """README.md: an HF source's own card is kept as is; otherwise mzoo's card is written."""
    from mzoo.converters.card import CardFacts, known_base_model, render_card, training_facts

    readme = dst / "README.md"
    if src.fmt == "hf" and readme.exists():
        return readme.read_text(errors="replace"), False
    lay = src.layout
    layout = {} if src.fmt == "hf" or lay is None else {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "ep": lay.ep,
                                                        "spec": lay.spec}
    facts = CardFacts(
        repo_id=req.repo_id, cfg=src.cfg, dtype=str(src.dtype).replace("torch.", ""), source_format=src.fmt,
        layout=layout, iteration=src.iteration if src.fmt != "hf" else None, license=req.license,
        base_model=known_base_model(src.path, src.fmt, req.base_model),
        training=training_facts(src.path, src.fmt, src.iteration),
        has_tokenizer=any((dst / m).is_file() for m in TOKENIZER_MARKERS), revision=req.revision)
    card = render_card(facts)
    readme.write_text(card)
    return card, True


@contextmanager
def staging_folder(req: Request) -> Iterator[Path]:
    """--staging DIR (kept), or a folder in a fresh temporary directory removed on the way out."""
    if req.staging is not None:
        yield req.staging
        return
    root = Path(tempfile.mkdtemp(prefix="mzoo-push-"))
    try:
        yield root / req.repo_id.split("/")[1]
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- output ---------------------------------------------------------------------------------------------
def _commit_message(src, req: Request) -> tuple[str, str]:
    from mzoo.params import count_params, human

    total = count_params(src.cfg).total
    message = req.message or f"Upload {src.cfg.family} model ({human(total)} parameters) with mzoo push"
    how = "Uploaded as is from a Hugging Face checkpoint" if src.fmt == "hf" else \
        f"Converted from a Megatron {src.fmt} checkpoint"
    return message, f"{how} by `mzoo push`; see README.md and mzoo.yaml."


def _report(req: Request, src, files: list[UploadFile], card: str, generated: bool, staging: Optional[Path],
            commit: Any, as_json: bool, quiet: bool) -> None:
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
TRUST = typer.Option(False, "--trust-pickle", help="Unpickle objects outside mzoo's allowlist.")
VOCAB = typer.Option(None, "--vocab-size", help="True vocabulary size if unrecorded.")
JSON = typer.Option(False, "--json", help="Print a JSON summary (files, card, commit) on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress or summary.")


@user_errors
def push(
    ckpt: Path = CKPT, repo_id: str = REPO, revision: str = REVISION, private: bool = PRIVATE,
    commit_message: Optional[str] = MESSAGE, token_env: Optional[str] = TOKEN_ENV, dry_run: bool = DRY_RUN,
    staging: Optional[Path] = STAGING, endpoint: Optional[str] = ENDPOINT, license: Optional[str] = LICENSE,
    base_model: Optional[str] = BASE, tokenizer: Optional[Path] = TOKENIZER, trust_pickle: bool = TRUST,
    vocab_size: Optional[int] = VOCAB, as_json: bool = JSON, quiet: bool = QUIET,
) -> None:
    """Publish a checkpoint to the Hugging Face Hub as one commit, with a generated model card.

    Megatron checkpoints (any format, any layout) are converted to Hugging Face safetensors on the way.

    The token comes from --token-env VAR, HF_TOKEN or the `hf auth login` file; it is never printed.

    Example: mzoo push ./llama-mcore my-org/llama-tiny --revision v1 --private --license apache-2.0
    (look first: mzoo push ./llama-mcore my-org/llama-tiny --dry-run --staging ./upload)
    """
    from mzoo import hub

    req, token = _request(repo_id, revision, endpoint, private, dry_run, license, base_model, commit_message,
                          staging, token_env)
    quiet_transformers()
    src = open_complete(ckpt, trust_pickle, vocab_size)
    tok_files = _tokenizer(src, tokenizer)
    _check_tokenizer(tok_files, src.cfg.vocab_size)
    _check_space(src, staging.parent if staging else Path(tempfile.gettempdir()), tok_files)

    show = not (quiet or as_json)
    remote = _connect(req, token, show, quiet) if token is not None else None
    with staging_folder(req) as folder:
        total = src.nbytes if src.fmt != "hf" else sum(src.files.values())
        label = f"{src.fmt} -> hf (staging)" if src.fmt != "hf" else "linking into staging"
        with byte_progress(total, label, not show) as tick:
            stage(src, folder, tok_files, tick)
        card, generated = write_card(src, folder, req)
        files = hub.upload_files(folder)
        commit = None
        if remote is not None:
            message, description = _commit_message(src, req)
            if show and err_console.is_terminal:  # in logs stderr stays the one error sentence
                size = sum(f.bytes for f in files) / 1e9
                err_console.print(f"uploading {len(files)} files ({size:.3f} GB) to {repo_id} ({revision})",
                                  style="dim", markup=False, highlight=False)
            with hub.progress_bars(show):  # huggingface_hub's own bars: per LFS file, or Xet's
                commit = remote.commit(repo_id, folder, [f.path for f in files], revision, message, description)
        _report(req, src, files, card, generated, staging, commit, as_json, quiet)


def _request(repo_id: str, revision: str, endpoint: Optional[str], private: bool, dry_run: bool,
             license: Optional[str], base_model: Optional[str], message: Optional[str], staging: Optional[Path],
             token_env: Optional[str]):
    """Every check of the command line itself, before the checkpoint is opened; the token unless --dry-run."""
    from mzoo import hub
    from mzoo.converters.card import DEFAULT_LICENSE, validate_license

    hub.validate_repo_id(repo_id)
    hub.validate_branch(revision)
    url = hub.resolve_endpoint(endpoint)
    lic = license or DEFAULT_LICENSE
    validate_license(lic)
    if base_model is not None:
        hub.validate_repo_id(base_model, "--base-model")
    if message is not None and not message.strip():
        raise UserError("--commit-message is empty; give a title or leave the option out.")
    token = None if dry_run else hub.require_token(token_env)
    if not dry_run:
        hub.check_online()
    _check_staging(staging)
    return Request(repo_id, revision, url, private, dry_run, lic, base_model, message, staging), token


def _connect(req: Request, token, show: bool, quiet: bool):
    """The hub side before any work: the token (401 here is unambiguous), the repository, the branch."""
    from mzoo import hub

    def warn(message: str) -> None:
        if not quiet:
            err_console.print(f"retrying: {message}", style="yellow", markup=False, highlight=False)

    remote = hub.Hub(req.endpoint, token, RETRY, on_event=warn)
    with err_console.status(f"checking the token and {req.repo_id} at {req.endpoint}") if show else nullcontext():
        remote.whoami(req.repo_id)
        remote.ensure_repo(req.repo_id, req.private)
        remote.ensure_branch(req.repo_id, req.revision)
    return remote
