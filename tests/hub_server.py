"""A local fake of the Hugging Face Hub's upload protocol, for `mzoo push` tests.

It serves, on 127.0.0.1 and a free port, exactly the endpoints huggingface_hub's HfApi calls for
whoami, create_repo, create_branch, repo_info, create_commit (README metadata validation, the
preupload call, the Git LFS batch API, the presigned upload PUT, the verify call, the NDJSON commit)
with the Hub's status codes and X-Error-Code headers, and keeps what arrives so a test can compare
bytes. Uploads use the HTTP LFS protocol: the Xet protocol (hf_xet, a separate CAS service) is not
spoken here, so tests turn it off with huggingface_hub's own HF_HUB_DISABLE_XET switch.

    with FakeHub(tokens={"hf_good": {"me", "my-org"}}) as hub:
        ...  # push to hub.url
        hub.files("my-org/tiny")  # {path: bytes} on main
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".model", ".gguf")
REGULAR_LIMIT = 10 * 1024 * 1024  # the Hub sends bigger files through LFS whatever their name
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LICENSES = {"apache-2.0", "mit", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "other",
            "unknown", "cc-by-4.0", "cc-by-nc-4.0", "bsd-3-clause", "openrail"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Stored:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the preupload endpoint reports: sha256 for LFS files, the git blob sha1 otherwise."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    branch: str
    summary: str
    description: str
    paths: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, Stored]] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)


@dataclass(frozen=True)
class Seen:
    """One request as it arrived (the Authorization header kept verbatim for assertions)."""

    method: str
    path: str
    authorization: Optional[str]
    body: bytes


@dataclass
class Failure:
    method: str
    pattern: re.Pattern
    status: Optional[int]  # None: drop the connection without answering
    times: int


class FakeHub:
    """The fake hub: state, failure injection and the HTTP server thread."""

    def __init__(self, tokens: dict[str, set[str]], user: str = "me", orgs: tuple[str, ...] = ("my-org", "their-org")):
        self.tokens = tokens  # token -> namespaces it may write to
        self.user = user
        self.orgs = orgs  # namespaces that exist (the user's own always does)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.seen: list[Seen] = []
        self.create_payloads: list[dict[str, Any]] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    # ---- test API -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, pattern: str, status: Optional[int], times: int = 1) -> None:
        """Answer the next `times` requests matching METHOD + path regex with `status` (None: drop)."""
        self.failures.append(Failure(method, re.compile(pattern), status, times))

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return {p: s.data for p, s in self.repos[repo_id].branches[branch].items()}

    def uploads(self) -> list[Seen]:
        """Requests that carried content to the hub (LFS PUTs and commits)."""
        return [s for s in self.seen if s.method == "PUT" or s.path.split("?")[0].rsplit("/", 2)[-2] == "commit"]

    def add_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private, {"main": {".gitattributes": Stored(GITATTRIBUTES, False)}})
        repo.commits.append(Commit(hashlib.sha1(repo_id.encode()).hexdigest(), "main", "initial commit", "",
                                   [".gitattributes"]))
        self.repos[repo_id] = repo
        return repo


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


_NAME = r"[A-Za-z0-9_.-]+"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # ---- plumbing ---------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any = None, headers: Optional[dict[str, str]] = None) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            body = self._body()
            path = urlsplit(self.path).path
            hub.seen.append(Seen(method, self.path, self.headers.get("Authorization"), body))
            for f in hub.failures:
                if f.times > 0 and f.method == method and f.pattern.search(path):
                    f.times -= 1
                    if f.status is None:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self._send(f.status, {"error": f"injected {f.status}"}, {"X-Error-Message": f"injected {f.status}"})
                    return
            try:
                with hub.lock:
                    status, payload = self._route(method, path, body)
            except HubError as e:
                headers = {"X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                self._send(e.status, {"error": e.message, **e.extra}, headers)
                return
            self._send(status, payload)

        def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
            routes = [
                ("GET", r"/api/whoami-v2", self.whoami),
                ("POST", r"/api/repos/create", self.create_repo),
                ("POST", r"/api/validate-yaml", self.validate_yaml),
                ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self.repo_info),
                ("GET", rf"/api/models/{_REPO}/refs", self.refs),
                ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", self.create_branch),
                ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
                ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self.commit),
                ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
                ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", self.lfs_put),
                ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", self.lfs_verify),
            ]
            for m, pattern, fn in routes:
                match = re.fullmatch(pattern, path)
                if m == method and match:
                    return fn(body, **{k: unquote(v) for k, v in match.groupdict().items() if v is not None})
            raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} {path}).")

        # ---- auth ----------------------------------------------------------------------------------
        def _writable(self) -> set[str]:
            auth = self.headers.get("Authorization") or ""
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if token not in hub.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            return hub.tokens[token]

        def _repo(self, repo_id: str, write: bool) -> Repo:
            writable = self._writable()
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            if write and repo_id.split("/")[0] not in writable:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
            return repo

        def _branch(self, repo: Repo, rev: str) -> dict[str, Stored]:
            if rev not in repo.branches:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return repo.branches[rev]

        # ---- endpoints -----------------------------------------------------------------------------
        def whoami(self, body: bytes) -> tuple[int, Any]:
            self._writable()
            return 200, {"type": "user", "name": hub.user, "orgs": [{"name": o} for o in hub.orgs],
                         "auth": {"type": "access_token"}}

        def create_repo(self, body: bytes) -> tuple[int, Any]:
            writable = self._writable()
            payload = json.loads(body)
            hub.create_payloads.append(payload)
            namespace = payload.get("organization") or hub.user
            repo_id = f"{namespace}/{payload['name']}"
            if namespace != hub.user and namespace not in hub.orgs:
                raise HubError(404, f"Organization {namespace} not found")
            if namespace not in writable:
                raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
            if repo_id in hub.repos:
                raise HubError(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
            hub.add_repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
            return 200, {"url": f"{hub.url}/{repo_id}", "name": repo_id}

        def validate_yaml(self, body: bytes) -> tuple[int, Any]:
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if not match:
                return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as e:
                raise HubError(400, f"Invalid YAML: {e}")
            if not isinstance(meta, dict) or meta.get("license") not in LICENSES:
                raise HubError(400, f"\"license\" must be one of the Hub's identifiers, got {meta.get('license')!r}")
            return 200, {"errors": [], "warnings": []}

        def repo_info(self, body: bytes, repo: str, rev: str = "main") -> tuple[int, Any]:
            r = self._repo(repo, write=False)
            tree = self._branch(r, rev)
            sha = next(c.oid for c in reversed(r.commits) if c.branch == rev)
            return 200, {"id": repo, "sha": sha, "private": r.private, "siblings": [{"rfilename": p} for p in tree]}

        def refs(self, body: bytes, repo: str) -> tuple[int, Any]:
            r = self._repo(repo, write=False)
            return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": "0" * 40}
                                      for b in r.branches], "converts": [], "tags": []}

        def create_branch(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
            r = self._repo(repo, write=True)
            if rev in r.branches:
                raise HubError(409, f"Branch {rev} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            r.branches[rev] = dict(self._branch(r, start))
            r.commits.append(Commit(hashlib.sha1(f"{repo}@{rev}".encode()).hexdigest(), rev, "branch", "", []))
            return 200, {}

        def preupload(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
            r = self._repo(repo, write=True)
            tree = self._branch(r, rev)
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > REGULAR_LIMIT
                old = tree.get(f["path"])
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": old.oid if old is not None and old.lfs == lfs else None})
            return 200, {"files": files, "commitOid": r.commits[-1].oid}

        def lfs_batch(self, body: bytes, repo: str) -> tuple[int, Any]:
            self._repo(repo, write=True)
            request = json.loads(body)
            assert request["operation"] == "upload" and request.get("hash_algo") == "sha256"
            objects = []
            for o in request["objects"]:
                entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in hub.lfs:  # already stored: no actions, the client skips the upload
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-storage/{o['oid']}", "expires_in": 900},
                        "verify": {"href": f"{hub.url}/{repo}.git/info/lfs/objects/verify"},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}

        def lfs_put(self, body: bytes, oid: str) -> tuple[int, Any]:
            if hashlib.sha256(body).hexdigest() != oid:  # what S3 + the hub's verify would refuse
                raise HubError(400, "content does not match its sha256")
            hub.lfs[oid] = body
            return 200, None

        def lfs_verify(self, body: bytes, repo: str) -> tuple[int, Any]:
            self._repo(repo, write=True)
            o = json.loads(body)
            if len(hub.lfs.get(o["oid"], b"")) != o["size"] or o["oid"] not in hub.lfs:
                raise HubError(404, f"object {o['oid']} not found")
            return 200, {}

        def commit(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
            r = self._repo(repo, write=True)
            tree = self._branch(r, rev)
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                raise HubError(400, "the first NDJSON line must be the header")
            header, ops = lines[0]["value"], lines[1:]
            new = dict(tree)
            for op in ops:
                key, value = op["key"], op["value"]
                if key == "file":
                    assert value["encoding"] == "base64"
                    new[value["path"]] = Stored(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = hub.lfs.get(value["oid"])
                    if data is None or ("size" in value and len(data) != value["size"]):
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    new[value["path"]] = Stored(data, True)
                elif key == "deletedFile":
                    new.pop(value["path"], None)
                else:
                    raise HubError(400, f"unsupported commit operation {key}")
            oid = hashlib.sha1(json.dumps([r.commits[-1].oid, header, sorted((p, s.oid) for p, s in new.items())])
                               .encode()).hexdigest()
            r.branches[rev] = new
            r.commits.append(Commit(oid, rev, header["summary"], header.get("description", ""),
                                    [op["value"]["path"] for op in ops]))
            return 200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                         "pullRequestUrl": None}

    return Handler
