"""`mzoo push`: publish a checkpoint to the Hugging Face Hub as one commit, with a model card.

Every check that can fail (the request, the token, the checkpoint's completeness, the tokenizer, disk
space, the hub's repository and branch) runs before the staging folder is built; Megatron sources
are converted to Hugging Face safetensors on the way. The CLI supplies progress and messages
through `PushEvents`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mzoo import hub
from mzoo.ckpt.atomic import atomic_dir
from mzoo.ckpt.assets import MARKERS as TOKENIZER_MARKERS, Assets, folder_assets, tokenizer_assets, vocabulary
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.errors import UserError
from mzoo.hub import RetryPolicy, UploadFile
from mzoo.jobs.card import DEFAULT_LICENSE, CardFacts, checkpoint_root, known_base_model, render_card, \
    training_facts, validate_license
from mzoo.jobs.convert import Progress, convert, no_progress, validate_target
from mzoo.jobs.inspect import describe
from mzoo.jobs.sources import Source, open_source
from mzoo.params import count_params, human

RETRY = RetryPolicy()  # tests shorten the waits




@dataclass(frozen=True)
class Request:  # the hub side of a PushRequest, validated
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


def _check_staging(staging: Optional[Path]) -> None:
    if staging is None:
        return
    if staging.exists():
        raise UserError(f"--staging {staging} already exists; pass a new folder (mzoo creates it and keeps it).")
    if not staging.parent.is_dir():
        raise UserError(f"--staging {staging}: the parent folder {staging.parent} does not exist; create it first.")


def open_complete(ckpt: Path, trust_pickle: bool, vocab_size: Optional[int]):
    """The checkpoint as a Source, refused when it is incomplete or disagrees with its mzoo.yaml."""

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


def _assets(src, tokenizer: Optional[Path]) -> Assets:
    """What to publish beside the weights: the source's assets, with --tokenizer DIR's files over
    them; tokenizer files beside an older mzoo Megatron root count as the source's."""
    if tokenizer is not None:
        return src.assets.with_tokenizer(tokenizer_assets(tokenizer))
    if src.assets.has_tokenizer:
        return src.assets
    root, _ = checkpoint_root(src.path, src.fmt)
    beside = folder_assets(root)
    return src.assets.with_tokenizer(beside) if beside.has_tokenizer else src.assets


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
    size = max(vocabulary(data).values(), default=-1) + 1
    if size > vocab_size:
        raise UserError(f"the tokenizer in {path.parent} has ids up to {size - 1} but the model's vocabulary has "
                        f"{vocab_size} rows; pass the tokenizer the model was trained with (--tokenizer DIR).")


def _check_space(src, parent: Path, assets: Assets) -> None:
    """The staging folder must fit: a converted model needs its bytes, an HF source only when it
    cannot be hard-linked (another file system)."""
    need = assets.nbytes()
    if src.fmt != "hf":
        need += src.nbytes
    elif os.stat(src.path).st_dev != os.stat(parent).st_dev:
        need += sum(src.files.values())
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UserError(f"the staging folder needs {need / 1e9:.2f} GB but {parent} has {free / 1e9:.2f} GB free; "
                        "pass --staging on a larger disk (or set TMPDIR).")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(src, dst: Path, assets: Assets, tick: Callable[[int], None]) -> None:
    """The folder to upload, built atomically: an HF source linked (or copied) file by file, any
    other source converted to HF by the streaming pipeline."""

    if src.fmt != "hf":
        src.assets = assets  # save_hf copies them next to config.json
        convert(src, dst, Target("hf"), progress=tick)
        return
    with atomic_dir(dst) as tmp:
        for rel, size in src.files.items():
            if not any(part.startswith(".") or ".mzoo-tmp" in part for part in Path(rel).parts):
                _link_or_copy(src.path / rel, tmp / rel)
                tick(size)
        for f in assets.files:  # --tokenizer replaces the folder's own files of the same name
            if (tmp / f.name).exists() and not (tmp / f.name).samefile(f):
                (tmp / f.name).unlink()
            if not (tmp / f.name).exists():
                _link_or_copy(f, tmp / f.name)


def _stored_dtype(src) -> str:
    """What the uploaded weights are stored as: an HF folder goes up as it is, MXFP4 halves included."""
    dtype = str(src.dtype).replace("torch.", "")
    return f"{dtype} and {src.quantization.upper()}" if src.fmt == "hf" and src.quantization else dtype


def write_card(src, dst: Path, req: Request) -> tuple[str, bool]:
    """README.md: an HF source's own card is kept as is; otherwise mzoo's card is written."""

    readme = dst / "README.md"
    if src.fmt == "hf" and readme.exists():
        return readme.read_text(errors="replace"), False
    lay = src.megatron
    layout = {} if src.fmt == "hf" or lay is None else {"tp": lay.layout.tp, "pp": lay.layout.pp,
                                                        "vpp": lay.layout.vpp, "ep": lay.layout.ep,
                                                        "spec": lay.spelling}
    facts = CardFacts(
        repo_id=req.repo_id, cfg=src.cfg, dtype=_stored_dtype(src), source_format=src.fmt,
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


def _commit_message(src, req: Request) -> tuple[str, str]:

    total = count_params(src.cfg).total
    message = req.message or f"Upload {src.cfg.family} model ({human(total)} parameters) with mzoo push"
    how = "Uploaded as is from a Hugging Face checkpoint" if src.fmt == "hf" else \
        f"Converted from a Megatron {src.fmt} checkpoint"
    return message, f"{how} by `mzoo push`; see README.md and mzoo.yaml."


def _request(repo_id: str, revision: str, endpoint: Optional[str], private: bool, dry_run: bool,
             license: Optional[str], base_model: Optional[str], message: Optional[str], staging: Optional[Path],
             token_env: Optional[str]):
    """Every check of the command line itself, before the checkpoint is opened; the token unless --dry-run."""

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


def _connect(req: Request, token: str, events: PushEvents) -> "hub.Hub":
    """The hub side before any work: the token (401 here is unambiguous), the repository, the branch."""
    remote = hub.Hub(req.endpoint, token, RETRY, on_event=events.retrying)
    with events.status(f"checking the token and {req.repo_id} at {req.endpoint}"):
        remote.whoami(req.repo_id)
        remote.ensure_repo(req.repo_id, req.private)
        remote.ensure_branch(req.repo_id, req.revision)
    return remote


# ---- the job ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushRequest:
    """`mzoo push` as typed: what to publish and where."""

    ckpt: Path
    repo_id: str
    revision: str = "main"
    endpoint: Optional[str] = None
    private: bool = False
    dry_run: bool = False
    license: Optional[str] = None
    base_model: Optional[str] = None
    message: Optional[str] = None
    staging: Optional[Path] = None
    tokenizer: Optional[Path] = None
    trust_pickle: bool = False
    vocab_size: Optional[int] = None
    token_env: Optional[str] = None


@dataclass
class PushEvents:
    """How the job reports while it works (the CLI draws bars and prints; a library caller may not)."""

    progress: Progress = no_progress
    status: Callable[[str], AbstractContextManager[Any]] = lambda text: nullcontext()
    retrying: Callable[[str], None] = lambda message: None
    uploading: Callable[[str], AbstractContextManager[Any]] = lambda message: nullcontext()  # around the commit


@dataclass
class PushResult:
    request: Request
    source: Source
    files: list[UploadFile]
    card: str
    card_generated: bool
    commit: Any = None  # hub.Commit when something was uploaded

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def push(request: PushRequest, events: PushEvents = PushEvents()) -> PushResult:
    """Check everything, stage the upload folder, write the card, and (unless a dry run) commit it."""
    req, token = _request(request.repo_id, request.revision, request.endpoint, request.private, request.dry_run,
                          request.license, request.base_model, request.message, request.staging, request.token_env)
    src = open_complete(request.ckpt, request.trust_pickle, request.vocab_size)
    assets = _assets(src, request.tokenizer)
    _check_tokenizer(assets.tokenizer_files, src.cfg.vocab_size)
    _check_space(src, req.staging.parent if req.staging else Path(tempfile.gettempdir()), assets)
    remote = _connect(req, token, events) if token is not None else None
    with staging_folder(req) as folder:
        total = src.nbytes if src.fmt != "hf" else sum(src.files.values())
        label = f"{src.fmt} -> hf (staging)" if src.fmt != "hf" else "linking into staging"
        with events.progress(total, label) as tick:
            stage(src, folder, assets, tick)
        card, generated = write_card(src, folder, req)
        files = hub.upload_files(folder)
        commit = None
        if remote is not None:
            message, description = _commit_message(src, req)
            size = sum(f.bytes for f in files) / 1e9
            with events.uploading(f"uploading {len(files)} files ({size:.3f} GB) to {req.repo_id} ({req.revision})"):
                commit = remote.commit(req.repo_id, folder, [f.path for f in files], req.revision, message,
                                       description)
    return PushResult(req, src, files, card, generated, commit)
