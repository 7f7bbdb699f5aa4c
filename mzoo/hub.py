"""Publishing a folder to a Hugging Face Hub: input checks, the token, retries, one commit.

huggingface_hub's HfApi does the protocol (create_repo, create_branch, create_commit: preupload,
LFS or Xet transfer, the NDJSON commit); this module decides the order, retries what is safe to
retry, and turns every failure into one sentence. The token is passed explicitly, never logged,
and scrubbed from any message that leaves this module.
"""

from __future__ import annotations

import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar
from urllib.parse import urlsplit

from mzoo.errors import UserError

DEFAULT_ENDPOINT = "https://huggingface.co"
_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_BRANCH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
T = TypeVar("T")


class HubError(UserError):
    """The hub refused or could not be reached; the message says why and what to do."""


# ---- input checks (before any work) -----------------------------------------------------------------
def validate_repo_id(repo_id: str, what: str = "the repository id") -> None:
    """The Hub's naming rules for ORG/NAME, one sentence per rule."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"{what} '{repo_id}' must be ORG/NAME (e.g. my-org/llama-tiny).")
    for part in parts:
        if len(part) > 96:
            raise UserError(f"'{part}' in {what} '{repo_id}' is longer than the Hub's 96 characters.")
        if "--" in part or ".." in part:
            raise UserError(f"{what} '{repo_id}' contains '--' or '..', which the Hub forbids.")
        if not _PART.fullmatch(part):
            raise UserError(f"{what} '{repo_id}' may only use letters, digits, '-', '_' and '.', and no part may "
                            "start or end with '-' or '.'.")
    if repo_id.endswith(".git"):
        raise UserError(f"{what} '{repo_id}' may not end in '.git'.")


def validate_branch(name: str) -> None:
    """A branch name the Hub (git) accepts: what --revision commits to, created when missing."""
    bad = (not _BRANCH.fullmatch(name) or ".." in name or "//" in name or name.endswith(("/", ".", ".lock"))
           or name.startswith("refs/") or re.fullmatch(r"[0-9a-f]{40}", name) is not None)
    if bad:
        raise UserError(f"--revision '{name}' is not a branch name; use letters, digits, '-', '_', '.' and '/' "
                        "(e.g. v1 or exp/lr-3e-4), not a commit id or refs/ path.")


def resolve_endpoint(endpoint: Optional[str], environ: Optional[dict[str, str]] = None) -> str:
    """--endpoint, else HF_ENDPOINT, else huggingface.co; an http(s) URL without trailing slash."""
    environ = os.environ if environ is None else environ
    url = (endpoint or environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UserError(f"endpoint '{url}' is not an http(s) URL such as {DEFAULT_ENDPOINT}.")
    return url


def check_online() -> None:
    """huggingface_hub refuses every request in offline mode: say so before any work."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so no hub can be reached; unset it to push "
                        "(--dry-run works offline).")


# ---- the token ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    """A hub token and where it came from; the value never appears in repr, logs or messages."""

    value: str = field(repr=False)
    source: str  # "HF_TOKEN", "$MY_VAR", or the token file's path


def token_file(environ: Optional[dict[str, str]] = None) -> Path:
    """Where `hf auth login` stores the token: HF_TOKEN_PATH, else $HF_HOME/token, else
    $XDG_CACHE_HOME/huggingface/token (~/.cache by default); read when asked, not at import."""
    environ = os.environ if environ is None else environ
    if environ.get("HF_TOKEN_PATH"):
        return Path(os.path.expandvars(environ["HF_TOKEN_PATH"])).expanduser()
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "token"


def _clean(value: Optional[str]) -> Optional[str]:
    return (value or "").replace("\r", "").replace("\n", "").strip() or None


def resolve_token(token_env: Optional[str] = None, environ: Optional[dict[str, str]] = None) -> Optional[Token]:
    """--token-env VAR, else HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), else the token file."""
    environ = os.environ if environ is None else environ
    if token_env is not None:
        if not _ENV_NAME.fullmatch(token_env) or token_env.startswith(("hf_", "api_")):  # a pasted token
            raise UserError(f"--token-env takes the name of an environment variable (e.g. HF_WRITE_TOKEN), "
                            f"not '{token_env[:3]}...'; never pass the token itself on the command line.")
        value = _clean(environ.get(token_env))
        if value is None:
            raise UserError(f"--token-env {token_env}: that environment variable is not set or empty; export your "
                            "write token in it.")
        return Token(value, f"${token_env}")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = _clean(environ.get(var))
        if value is not None:
            return Token(value, var)
    path = token_file(environ)
    try:
        value = _clean(path.read_text()) if path.is_file() else None
    except OSError as e:
        raise UserError(f"cannot read the token file {path} ({e.strerror}); fix its permissions or set "
                        "HF_TOKEN.") from None
    return Token(value, str(path)) if value else None


def require_token(token_env: Optional[str], environ: Optional[dict[str, str]] = None) -> Token:
    token = resolve_token(token_env, environ)
    if token is None:
        raise UserError(f"no Hugging Face token found: set HF_TOKEN, pass --token-env VAR, or run `hf auth login` "
                        f"(it writes {token_file(environ)}); --dry-run needs none.")
    return token


# ---- retries and error sentences ------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter for transient failures (5xx, 429, lost connections)."""

    attempts: int = 5
    base_seconds: float = 1.0
    max_seconds: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


_XET_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})")


def _http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status behind an error: huggingface_hub's carry the response; hf_xet (Rust) raises
    plain ConnectionError/RuntimeError whose text names it."""
    response = getattr(exc, "response", None)
    if response is not None:
        return getattr(response, "status_code", None)
    match = _XET_STATUS.search(str(exc)) if isinstance(exc, (OSError, RuntimeError)) else None
    return int(match.group(1)) if match else None


def _is_xet(exc: BaseException) -> bool:
    return "xet" in str(exc).lower()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc and what it wraps (huggingface_hub wraps LFS upload failures in RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _root_error(exc: BaseException) -> BaseException:
    """The HTTP error with a status if there is one in the chain, else the transport error, else exc."""
    from huggingface_hub.errors import HTTPError

    chain = list(_causes(exc))
    return (next((e for e in chain if _http_status(e) is not None), None)
            or next((e for e in chain if isinstance(e, HTTPError)), None) or exc)


def _from_hub_client(exc: BaseException) -> bool:
    """Raised by the network side (huggingface_hub, its HTTP client, hf_xet, sockets), as opposed
    to a bug here, which keeps its traceback."""
    if _http_status(exc) is not None or isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return any(part in where for part in ("huggingface_hub", "httpx", "hf_xet"))


def is_transient(exc: BaseException) -> bool:
    """5xx/429/408 answers and transport failures (refused, reset, timed out) are worth a retry."""
    from huggingface_hub.errors import HTTPError

    root = _root_error(exc)
    status = _http_status(root)
    if status is not None:
        return status in TRANSIENT_STATUS
    return isinstance(root, (HTTPError, ConnectionError, TimeoutError))


@dataclass
class Hub:
    """One hub endpoint and token; every call goes through `_call` (retries + one-sentence errors)."""

    endpoint: str
    token: Token
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_event: Callable[[str], None] = lambda message: None
    sleep: Callable[[float], None] = time.sleep

    api: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=self.endpoint, token=self.token.value, library_name="mzoo")

    def _scrub(self, text: str) -> str:
        return text.replace(self.token.value, "***") if self.token.value else text

    def _call(self, what: str, repo_id: str, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as one sentence
                if is_transient(exc) and attempt < self.retry.attempts:
                    wait = self.retry.delay(attempt)
                    self.on_event(f"{self._describe(exc)} while {what}; retry {attempt}/{self.retry.attempts - 1} "
                                  f"in {wait:.1f} s")
                    self.sleep(wait)
                    continue
                if not any(_from_hub_client(e) for e in _causes(exc)):
                    raise
                raise HubError(self._scrub(self._sentence(exc, what, repo_id, attempt))) from None
        raise AssertionError("unreachable")

    def _describe(self, exc: BaseException) -> str:
        root = _root_error(exc)
        status = _http_status(root)
        return f"the hub answered {status}" if status is not None else f"the connection failed ({type(root).__name__})"

    def _sentence(self, exc: BaseException, what: str, repo_id: str, attempt: int) -> str:
        root = _root_error(exc)
        status = _http_status(root)
        namespace = repo_id.split("/")[0]
        if status == 401:
            return (f"{self.endpoint} rejected the token from {self.token.source} (401 Unauthorized); create a write "
                    "token at https://huggingface.co/settings/tokens and put it in HF_TOKEN or --token-env.")
        if status == 403:
            return (f"the token from {self.token.source} may not write to {repo_id} (403 Forbidden) while {what}; use "
                    f"a token with write access to '{namespace}' or push to a namespace you own.")
        if status == 404:
            xet = " (or it does not offer Xet storage: set HF_HUB_DISABLE_XET=1)" if _is_xet(root) else ""
            return (f"{self.endpoint} answered 404 Not Found while {what}: the organisation '{namespace}' or the "
                    f"repository does not exist there, or --endpoint/HF_ENDPOINT is not a Hugging Face Hub{xet}.")
        if status is not None:
            server = getattr(root, "server_message", None) or ""
            detail = f" ({server.strip().splitlines()[0]})" if server.strip() else ""
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            return f"{self.endpoint} answered {status}{detail} while {what}{tries}; try again later."
        from huggingface_hub.errors import HTTPError

        if isinstance(root, (HTTPError, ConnectionError, TimeoutError)):
            return (f"cannot reach {self.endpoint} ({type(root).__name__}) while {what} after {attempt} attempts; "
                    "check the network and --endpoint/HF_ENDPOINT.")
        first = (str(root).strip().splitlines() or [type(root).__name__])[0]
        return f"pushing to {repo_id} failed while {what}: {first}"

    # ---- the steps of a push -------------------------------------------------------------------------
    def whoami(self, repo_id: str) -> str:
        """Checks the token before any work: a bad one fails here with 401, unambiguously."""
        info = self._call("checking the token", repo_id, lambda: self.api.whoami())
        return str(info.get("name", "?"))

    def ensure_repo(self, repo_id: str, private: bool) -> None:
        """Create the repository if missing; an existing one is used as is, except that --private
        refuses an existing public repository (the upload would be public)."""
        def create() -> None:
            try:
                self.api.create_repo(repo_id, private=private or None, exist_ok=True)
            except Exception as e:
                # huggingface_hub answers "no right to create, but the repo exists" (403, then repo_info
                # succeeds) with a RepoUrl parsed against HF_ENDPOINT, which fails for another
                # --endpoint; the repository exists, which is all this step needs
                if type(e).__name__ != "HfUriError":
                    raise

        self._call(f"creating {repo_id}", repo_id, create)
        if private:
            info = self._call(f"reading {repo_id}", repo_id, lambda: self.api.repo_info(repo_id))
            if info.private is False:
                raise HubError(f"{repo_id} already exists and is public, so --private would not keep this upload "
                               "private; make the repository private on the Hub first, or drop --private.")

    def ensure_branch(self, repo_id: str, branch: str) -> None:
        if branch != "main":
            self._call(f"creating branch {branch}", repo_id,
                       lambda: self.api.create_branch(repo_id, branch=branch, exist_ok=True))

    def commit(self, repo_id: str, folder: Path, files: list[str], branch: str, message: str,
               description: str = "") -> "CommitResult":
        """One commit with every file; retried whole (fresh operations each time): files already
        uploaded are skipped by the hub's LFS batch answer, unchanged files by preupload's oids."""
        from huggingface_hub import CommitOperationAdd

        def attempt() -> "CommitResult":
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            info = self.api.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                          revision=branch)
            return CommitResult(str(info.oid), str(info.commit_url))

        return self._call(f"uploading to {repo_id}", repo_id, attempt)


@dataclass(frozen=True)
class CommitResult:
    oid: str
    url: str


# ---- the folder to upload -------------------------------------------------------------------------------
@dataclass(frozen=True)
class UploadFile:
    path: str  # relative, '/'-separated: the path in the repository
    bytes: int


def upload_files(folder: Path) -> list[UploadFile]:
    """Every regular file under `folder`, sorted; hidden files and folders (.git, .cache) are left out."""
    out = []
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(UploadFile(rel.as_posix(), p.stat().st_size))
    return out


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own upload bars (tqdm, Xet) on or off for the duration of a push."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()
