"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

Tests drive the REAL ``huggingface_hub`` client (and ``transformers`` / ``timm``, which download through it)
against this server on ``127.0.0.1``. Nothing is mocked on the client side. The subset of the Hub API
implemented here was read off the requests that huggingface_hub 2.4.0 sends.

Python API
==========

    server = HubServer(root=tmp_path / "hub")   # on-disk storage; HubServer() uses a private temp dir
    server.start()                              # binds 127.0.0.1 on a free port (or `port=`)
    server.url                                  # "http://127.0.0.1:<port>"
    env = server.client_env(hf_home=tmp_path / "hf_home")   # env for a client subprocess
    run_client("from huggingface_hub import HfApi; emit(HfApi().whoami()['name'])", env)  # -> "test-user"

    # failure injection (see "Failure injection" below)
    server.fail_next("commit", status=500)                  # next commit answers HTTP 500
    server.fail_next("lfs_upload", status=503, count=None)  # every LFS PUT fails until cleared
    server.drop_next("lfs_upload", after_bytes=1024)        # read 1 KiB of the PUT body, then drop
    server.drop_next("commit", during="response")           # commit is applied, response is lost
    server.clear_failures()
    server.stop(); server.start()                           # same port, same data ("server down")

    # inspection without HTTP (for assertions)
    server.branch_head("org/name")          # 40-hex sha of `main` (or None)
    server.read_file("org/name", "config.json", revision="main")  # bytes
    server.list_files("org/name")            # sorted paths at `main`
    server.history("org/name")               # [{id, parents, title, message, date, author, files}], newest first
    server.lfs_objects()                     # sha256 of every stored LFS object
    server.seed("org/name", {"config.json": b"{}"})   # create + commit through the HTTP API -> commit id
    server.requests                          # list[RequestRecord(method, path, endpoint, status)]

``HubServer`` is also a context manager (``with HubServer() as server: ...``).

Environment (client side)
=========================

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET``, ``HF_HOME``, ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` once, when it is IMPORTED (``huggingface_hub.constants``). A test process has usually
imported it long before a fixture runs (``hf_vcreg`` imports ``transformers``), so clients must run in a
subprocess started with :meth:`HubServer.client_env` (or the ``hub_env`` fixture of ``tests/conftest.py``):

* ``HF_ENDPOINT=<server.url>``, ``HF_TOKEN=hf_test_token`` (the server's default write token);
* ``HF_HUB_DISABLE_XET=1``: ``hf_xet`` is installed and without this every upload goes to Xet storage,
  which this server does not implement (huggingface_hub then uses the LFS batch API instead);
* ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_XET_CACHE`` in a temp dir, so the user's cache is never touched;
* ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``HUGGINGFACE_CO_STAGING``
  removed; telemetry, progress bars and update checks disabled; ``NO_PROXY`` extended with 127.0.0.1.

:func:`run_client` runs a Python snippet in such a subprocess; the snippet calls ``emit(obj)`` to hand a
JSON-serialisable result back.

Implemented endpoints
=====================

``{t}`` is models | datasets | spaces; ``{p}`` is "" | "datasets/" | "spaces/". Endpoint names (left) are
used by the failure injection and in ``server.requests``.

    whoami         GET    /api/whoami-v2                                HfApi.whoami
    create_repo    POST   /api/repos/create                             create_repo (409 + "url" if it exists)
    delete_repo    DELETE /api/repos/delete                             delete_repo
    validate_yaml  POST   /api/validate-yaml                            README.md in a commit, ModelCard
    repo_info      GET    /api/{t}/{ns}/{name}[/revision/{rev}]         repo_info, model_info (?blobs=)
    tree           GET    /api/{t}/{ns}/{name}/tree/{rev}[/{path}]      list_repo_tree, list_repo_files
    paths_info     POST   /api/{t}/{ns}/{name}/paths-info/{rev}         get_paths_info
    refs           GET    /api/{t}/{ns}/{name}/refs                     list_repo_refs
    commits        GET    /api/{t}/{ns}/{name}/commits/{rev}            list_repo_commits
    branch         POST|DELETE /api/{t}/{ns}/{name}/branch/{branch}     create_branch, delete_branch
    tag            POST   /api/{t}/{ns}/{name}/tag/{rev}                create_tag (DELETE .../tag/{tag})
    preupload      POST   /api/{t}/{ns}/{name}/preupload/{rev}          create_commit, step 1
    commit         POST   /api/{t}/{ns}/{name}/commit/{rev}             create_commit, NDJSON body
    lfs_batch      POST   /{p}{ns}/{name}.git/info/lfs/objects/batch    LFS batch API (upload, download)
    lfs_upload     PUT    /__lfs/objects/{sha256}                       LFS basic transfer (no auth, like S3)
    lfs_download   GET    /__lfs/objects/{sha256}                       LFS "download" action
    lfs_verify     POST   /__lfs/verify/{sha256}                        LFS verify action
    resolve        HEAD|GET /{p}{ns}/{name}/resolve/{rev}/{path}        hf_hub_download, snapshot_download,
                                                                        file_exists, HfFileSystem, ...

With these, ``upload_folder``/``upload_file``/``create_commit`` (``create_pr=False``), ``hf_hub_download``,
``snapshot_download``, ``repo_exists``/``file_exists``, transformers ``from_pretrained``/``push_to_hub``,
``timm.create_model("hf-hub:...", pretrained=True)``, ``ModelCard.push_to_hub`` and ``HfFileSystem``
reads work.
Anything else answers 404 (JSON ``error``) and is recorded with endpoint ``"unknown"``, so a test can
assert that a client only used implemented endpoints.

Semantics
=========

* Repos: ids are ``namespace/name``. ``create_repo`` makes an initial commit holding ``.gitattributes``
  (like the real Hub), so a new repo lists ``[".gitattributes"]``. ``private=True`` repos are only visible
  with a valid token. Any valid token may write to any namespace (no org permissions).
* Auth: ``Authorization: Bearer <token>``; ``tokens`` maps token -> user name (default
  ``{"hf_test_token": "test-user"}``). An unknown token gets 401 "Invalid credentials in Authorization
  header" (as on the Hub); writes without a token get 401.
* Upload mode (preupload answer): ``"lfs"`` for paths matching ``lfs_patterns`` (default
  ``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.h5``, ``*.onnx``, ``*.msgpack``,
  ``*.npy``, ``*.npz``, ``*.pkl``) or larger than ``lfs_threshold`` (10 MiB); ``"regular"`` otherwise.
  Regular files above the threshold are refused by the commit endpoint. (The client itself forces
  empty files to "regular".)
* Commits are atomic: every operation of the NDJSON body is validated first (LFS objects present with the
  right size, deleted paths exist, ``parentCommit`` is the branch head), then blobs and the commit object
  are written, and only then does the branch ref move (one atomic file replace). A rejected commit
  (e.g. an ``lfsFile`` whose object was never uploaded -> HTTP 400 with a JSON ``error``) changes nothing.
  Only commits to an existing branch are accepted; ``create_pr=1`` is refused with 400.
* Ids: commit ids are random-salted 40-hex sha1s with parent links; regular files have their git blob sha1
  as ``oid``/``ETag``; LFS files have the git sha1 of their pointer file as ``oid``/``ETag`` and their
  sha256 in ``lfs.oid`` and ``X-Linked-Etag`` (with ``X-Linked-Size``), as on the Hub. LFS objects are
  content addressed by sha256 and shared by all repos; the PUT endpoint checks sha256 and size.
* resolve: HEAD and GET answer 200 directly (no redirect) with ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``, ``Accept-Ranges: bytes`` and, for LFS files, ``X-Linked-Etag``/``X-Linked-Size``.
  ``Range: bytes=a-b`` / ``a-`` / ``-n`` gives 206 with ``Content-Range`` (416 if unsatisfiable). Errors
  carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so the client raises
  its specific exceptions.
* Listings are not paginated (no ``Link`` header); ``expand=True`` adds ``lastCommit`` to tree entries.

Storage (on disk, so a second process may read it and a restarted server sees the same data)
=============================================================================================

::

    root/lfs/<sha256[:2]>/<sha256>            LFS objects
    root/blobs/<sha1[:2]>/<sha1>              regular file contents (git blob sha1)
    root/repos/<type>s/<ns>/<name>/repo.json  {"id", "type", "private", "createdAt", "branches", "tags"}
    root/repos/<type>s/<ns>/<name>/commits/<sha>.json
                                              {"id", "parents", "title", "message", "date", "author",
                                               "tree": {path: {"oid", "size", "lfs": {...}|None}}}
    root/tmp/                                 partial uploads

Every file is written to a temp file and ``os.replace``-d, so readers never see half-written state. Each
commit stores its full file table (fine for test-sized repos). One server process writes a root at a time.

Failure injection
=================

Rules are checked in the order they were added; each request consumes at most one rule.

* ``fail_next(endpoint="any", *, status=500, count=1, message=None, method=None)``: the next ``count``
  matching requests (``count=None``: until :meth:`clear_failures`) get ``status`` with a JSON ``error``
  body; the request body is read and discarded and nothing is stored.
* ``drop_next(endpoint="any", *, count=1, after_bytes=0, during="request", method=None)``: drop the TCP
  connection. ``during="request"``: after reading ``after_bytes`` bytes of the request body, without
  processing it (nothing stored). ``during="response"``: the request is processed normally (a commit IS
  applied) and the connection is closed after the status line, the headers and ``after_bytes`` bytes of
  the body, so the client sees a truncated response (for a GET of a file: a download cut mid-way).
* ``stop()`` / ``start()``: while stopped, nothing listens on the port (client: connection refused);
  ``stop()`` also closes kept-alive connections. ``start()`` binds the same port again.

Both calls return the :class:`FailureRule`; ``rule.hits`` counts how often it fired. Endpoint names are
those of the table above, plus ``"any"``.

Client quirks worth knowing (huggingface_hub 2.4.0): the LFS PUT, the LFS batch and verify calls, the
preupload call and listings go through ``http_backoff``, which retries HTTP 408/429/500/502/503/504 and
connection errors up to 5 times with sleeps of 1, 2, 4, 8, 8 s. So ``fail_next("lfs_upload", status=500)``
(count=1) is survived by the client after a 1 s sleep, while a permanent failure of those endpoints takes
~23 s to surface; use a non-retried status such as 400/403 (or fail the ``commit`` endpoint, which is
posted once, without retry) to make a test fail fast. HEAD on ``resolve`` is not retried either.
Downloads are read in 10 MiB chunks (``constants.DOWNLOAD_CHUNK_SIZE``) and a cut download resumes (with
``Range``) from the last complete chunk, so a file must be larger than 10 MiB for a resume to be visible;
a smaller one is downloaded again from the start (200, not 206).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
import fnmatch
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "FailureRule",
    "HubServer",
    "RequestRecord",
    "run_client",
]

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "test-user"
DEFAULT_LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.onnx",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.pkl",
)
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024

ENDPOINTS = (
    "any",
    "whoami",
    "create_repo",
    "delete_repo",
    "validate_yaml",
    "repo_info",
    "tree",
    "paths_info",
    "refs",
    "commits",
    "branch",
    "tag",
    "preupload",
    "commit",
    "lfs_batch",
    "lfs_upload",
    "lfs_download",
    "lfs_verify",
    "resolve",
    "unknown",
)

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


# --------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------


def _now_iso() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _as_bool(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _valid_repo_path(path: str) -> bool:
    if not path or path.startswith("/") or path.endswith("/") or len(path) > 1000:
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and parts[0] != ".git"


class HubError(Exception):
    """Raised by route handlers; rendered as ``{"error": message}`` with ``X-Error-Code``/``-Message``."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, extra: dict | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # more keys for the JSON body


class RequestRecord(NamedTuple):
    method: str
    path: str
    endpoint: str
    status: int | None  # None while in progress, or when the connection was dropped before a status line


@dataclass
class FailureRule:
    """One failure-injection rule (see the module docstring)."""

    endpoint: str
    count: int | None  # remaining firings; None = until cleared
    status: int = 500
    message: str = "Injected failure (hub_server test)"
    drop: bool = False
    after_bytes: int = 0
    during: str = "request"
    method: str | None = None
    hits: int = 0

    def matches(self, endpoint: str, method: str) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.endpoint in ("any", endpoint)


# --------------------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------------------


class _Storage:
    """On-disk repos, commits, blobs and LFS objects (layout in the module docstring)."""

    def __init__(self, root: Path, lfs_patterns: tuple[str, ...]):
        self.root = root
        self.lfs_patterns = lfs_patterns
        for sub in ("lfs", "blobs", "repos", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()  # serialises every mutation (commit, ref moves, repo creation)
        self._commit_cache: dict[tuple[str, str], dict] = {}

    # ---- content-addressed objects
    def blob_path(self, oid: str) -> Path:
        return self.root / "blobs" / oid[:2] / oid

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256[:2] / sha256

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self.blob_path(oid)
        if not path.exists():
            _atomic_write(path, data)
        return oid

    def lfs_size(self, sha256: str) -> int | None:
        if not _SHA256_RE.match(sha256):
            return None
        try:
            return self.lfs_path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def entry_path(self, entry: dict) -> Path:
        return self.lfs_path(entry["lfs"]["oid"]) if entry.get("lfs") else self.blob_path(entry["oid"])

    # ---- repos
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        ns, name = repo_id.split("/")
        return self.root / "repos" / f"{repo_type}s" / ns / name

    def load_repo(self, repo_type: str, repo_id: str) -> dict | None:
        if repo_id.count("/") != 1:
            return None
        try:
            return json.loads((self.repo_dir(repo_type, repo_id) / "repo.json").read_bytes())
        except FileNotFoundError:
            return None

    def save_repo(self, repo: dict) -> None:
        data = json.dumps(repo, indent=1, sort_keys=True).encode()
        _atomic_write(self.repo_dir(repo["type"], repo["id"]) / "repo.json", data)

    def delete_repo(self, repo: dict) -> None:
        shutil.rmtree(self.repo_dir(repo["type"], repo["id"]), ignore_errors=True)

    def gitattributes(self) -> bytes:
        lines = [f"{p} filter=lfs diff=lfs merge=lfs -text" for p in self.lfs_patterns]
        return ("\n".join(lines) + "\n").encode()

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> dict:
        repo = {
            "id": repo_id,
            "type": repo_type,
            "private": private,
            "createdAt": _now_iso(),
            "branches": {},
            "tags": {},
        }
        attrs = self.gitattributes()
        tree = {".gitattributes": {"oid": self.put_blob(attrs), "size": len(attrs), "lfs": None}}
        commit = self.write_commit(repo, [], tree, "initial commit", "", author)
        repo["branches"]["main"] = commit["id"]
        self.save_repo(repo)
        return repo

    # ---- commits
    def write_commit(self, repo: dict, parents: list[str], tree: dict, title: str, message: str, author: str):
        date = _now_iso()
        salt = uuid.uuid4().hex
        payload = json.dumps([parents, sorted(tree.items()), title, message, date, author, salt], sort_keys=True)
        commit = {
            "id": hashlib.sha1(payload.encode()).hexdigest(),
            "parents": parents,
            "title": title,
            "message": message,
            "date": date,
            "author": author,
            "tree": tree,
        }
        path = self.repo_dir(repo["type"], repo["id"]) / "commits" / f"{commit['id']}.json"
        _atomic_write(path, json.dumps(commit, indent=1, sort_keys=True).encode())
        return commit

    def load_commit(self, repo: dict, sha: str) -> dict | None:
        key = (self.repo_dir(repo["type"], repo["id"]).as_posix(), sha)
        cached = self._commit_cache.get(key)
        if cached is not None:
            return cached
        if not _SHA1_RE.match(sha):
            return None
        try:
            commit = json.loads((self.repo_dir(repo["type"], repo["id"]) / "commits" / f"{sha}.json").read_bytes())
        except FileNotFoundError:
            return None
        self._commit_cache[key] = commit
        return commit

    def resolve(self, repo: dict, revision: str) -> str | None:
        """Branch, tag, ``refs/heads/x``, ``refs/tags/x``, full or (>= 7 chars) abbreviated commit id."""
        for prefix, table in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if revision.startswith(prefix):
                return repo[table].get(revision[len(prefix):])
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["tags"]:
            return repo["tags"][revision]
        if self.load_commit(repo, revision) is not None:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            commits_dir = self.repo_dir(repo["type"], repo["id"]) / "commits"
            found = [p.stem for p in commits_dir.glob(f"{revision}*.json")]
            if len(found) == 1:
                return found[0]
        return None

    def history(self, repo: dict, sha: str) -> Iterator[dict]:
        """First-parent history from ``sha``, newest first."""
        seen: set[str] = set()
        while sha and sha not in seen:
            seen.add(sha)
            commit = self.load_commit(repo, sha)
            if commit is None:
                return
            yield commit
            sha = commit["parents"][0] if commit["parents"] else None


# --------------------------------------------------------------------------------------------------------
# tree helpers (a commit's tree is a flat {path: entry} table)
# --------------------------------------------------------------------------------------------------------


def _dir_paths(tree: dict) -> set[str]:
    dirs = set()
    for path in tree:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return dirs


def _dir_oid(tree: dict, dirpath: str) -> str:
    prefix = dirpath + "/"
    items = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(prefix))
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()


def _signature(tree: dict | None, path: str):
    """What changes when ``path`` (file or folder) changes between two trees."""
    if tree is None:
        return None
    if path in tree:
        return tree[path]["oid"]
    prefix = path + "/" if path else ""
    items = tuple(sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(prefix)))
    return items or None


def _file_json(path: str, entry: dict) -> dict:
    out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry.get("lfs"):
        out["lfs"] = dict(entry["lfs"])
    return out


def _dir_json(tree: dict, path: str) -> dict:
    return {"type": "directory", "oid": _dir_oid(tree, path), "size": 0, "path": path}


# --------------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, hub: "HubServer"):
        self.hub = hub
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.open_connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _DroppedConnection(Exception):
    """Internal: the handler dropped the connection on purpose (failure injection)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries Content-Length
    server_version = "hf-vcreg-test-hub/1.0"
    server: _HTTPServer

    # -- entry points
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # noqa: A002 - silence stderr logging; see HubServer.requests
        pass

    # -- request body
    def _body_chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """Yield the request body (Content-Length or chunked), at most ``limit`` bytes if given."""
        if self._body_done:
            return
        budget = [limit]  # bytes still allowed to be read (None: no limit), shared by every part of the body
        cut = [False]  # set when the budget ran out before the body did

        def read(left: int) -> Iterator[bytes]:
            """Yield the next ``left`` bytes of the stream; stop early (``cut``) when the budget runs out."""
            while left:
                want = min(left, _CHUNK)
                if budget[0] is not None:
                    if budget[0] <= 0:
                        cut[0] = True
                        return
                    want = min(want, budget[0])
                data = self.rfile.read(want)
                if not data:
                    raise ConnectionError("client closed the connection mid-body")
                left -= len(data)
                if budget[0] is not None:
                    budget[0] -= len(data)
                yield data

        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                yield from read(size)
                if cut[0]:
                    return
                self.rfile.readline(16)  # CRLF after each chunk
        else:
            yield from read(int(self.headers.get("Content-Length") or 0))
            if cut[0]:
                return
        self._body_done = True

    def read_body(self) -> bytes:
        return b"".join(self._body_chunks())

    def discard_body(self) -> None:
        for _ in self._body_chunks():
            pass

    def read_json(self) -> Any:
        body = self.read_body()
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from None

    # -- responses
    def base_url(self) -> str:
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        return f"http://{host}"

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        raise _DroppedConnection()

    def _start_response(self, status: int, headers: dict, length: int) -> None:
        # log the status before any byte reaches the client, so the log is final once the client sees it
        self.server.hub._record_status(self._record_index, status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._status = status

    def send_bytes(self, status: int, body: bytes, headers: dict | None = None, content_type: str = "application/json"):
        headers = {"Content-Type": content_type, **(headers or {})}
        if not self._body_done:
            # the body was not read (early error): don't parse it as the next request
            self.close_connection = True
        self._start_response(status, headers, len(body))
        if self.command == "HEAD":
            return
        if self._drop_after is not None:
            self.wfile.write(body[: self._drop_after])
            self._drop()
        self.wfile.write(body)

    def send_json(self, obj: Any, status: int = 200, headers: dict | None = None, content_type="application/json"):
        self.send_bytes(status, json.dumps(obj).encode(), headers, content_type)

    def send_file(self, status: int, path: Path, start: int, length: int, headers: dict) -> None:
        self._start_response(status, headers, length)
        if self.command == "HEAD":
            return
        budget = self._drop_after  # failure injection: bytes of body to send before dropping
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left:
                data = f.read(min(left, _CHUNK))
                if not data:
                    break
                left -= len(data)
                if budget is None:
                    self.wfile.write(data)
                    continue
                part = data[:budget]
                self.wfile.write(part)
                budget -= len(part)
                if budget == 0:
                    self._drop()
        if budget is not None:
            self._drop()

    def send_error_json(self, err: HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message.replace("\r", " ").replace("\n", " ")[:500]
        self.send_json({"error": err.message, **err.extra}, err.status, headers)

    # -- dispatch
    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        self._body_done = method in ("GET", "HEAD", "DELETE") and not (
            self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding")
        )
        self._drop_after: int | None = None
        self._status: int | None = None
        url = urlsplit(self.path)
        self.query = parse_qs(url.query, keep_blank_values=True)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        endpoint, func, kwargs = hub._route(method, segments)
        self._record_index = hub._record(RequestRecord(method, self.path, endpoint, None))  # arrival order
        rule = hub._take_failure(endpoint, method)
        try:
            try:
                if rule is not None and rule.drop and rule.during == "request":
                    for _ in self._body_chunks(limit=rule.after_bytes):
                        pass
                    self._drop()
                if rule is not None and rule.drop:  # during == "response"
                    self._drop_after = rule.after_bytes
                if rule is not None and not rule.drop:
                    self.discard_body()
                    raise HubError(rule.status, rule.message)
                if func is None:
                    self.discard_body()
                    raise HubError(404, f"Unknown endpoint: {method} {url.path}")
                func(self, **kwargs)
            except HubError as err:
                self.send_error_json(err)
            except _DroppedConnection:
                raise
            except (ConnectionError, OSError):
                self.close_connection = True
                raise _DroppedConnection() from None
            except Exception as exc:  # a server bug: print it and answer 500 so the test shows it
                traceback.print_exc()
                self.close_connection = True
                if self._status is None:  # nothing sent yet
                    self.send_error_json(HubError(500, f"hub_server internal error: {exc!r}"))
        except _DroppedConnection:
            self.close_connection = True


# --------------------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------------------


class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1 (see the module docstring for the full contract)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: dict[str, str] | None = None,
        orgs: tuple[str, ...] = ("test-org",),
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
    ):
        self._tmpdir = None
        if root is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="hub_server_")
            root = self._tmpdir.name
        self.root = Path(root)
        self.host = host
        self.port = port
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.orgs = tuple(orgs)
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_threshold = lfs_threshold
        self.storage = _Storage(self.root, self.lfs_patterns)
        self.requests: list[RequestRecord] = []
        self._rules: list[FailureRule] = []
        self._state_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("HubServer was never started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "HubServer":
        """Start serving (on the previous port after a :meth:`stop`). Returns ``self``."""
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self.port), _Handler, hub=self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"hub-server-{self.port}"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close open (kept-alive) connections; data stays on disk."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_open_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def close(self) -> None:
        self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- client environment
    def client_env(
        self, hf_home: str | os.PathLike, token: str | None = DEFAULT_TOKEN, base: dict | None = None
    ) -> dict[str, str]:
        """Environment for a client subprocess talking to this server (see the module docstring)."""
        env = dict(os.environ if base is None else base)
        for var in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_DATASETS_OFFLINE",
            "HUGGINGFACE_CO_STAGING",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HUGGINGFACE_HUB_CACHE",
            "HF_HUB_ENABLE_HF_TRANSFER",
            "HF_XET_HIGH_PERFORMANCE",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN",
            "HF_ENDPOINT",
        ):
            env.pop(var, None)
        home = Path(hf_home)
        home.mkdir(parents=True, exist_ok=True)
        no_proxy = ",".join(x for x in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost") if x)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(home),
            HF_HUB_CACHE=str(home / "hub"),
            HF_XET_CACHE=str(home / "xet"),
            HF_ASSETS_CACHE=str(home / "assets"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            DISABLE_TELEMETRY="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
            PYTHONUNBUFFERED="1",
        )
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # ---- failure injection
    def fail_next(
        self,
        endpoint: str = "any",
        *,
        status: int = 500,
        count: int | None = 1,
        message: str | None = None,
        method: str | None = None,
    ) -> FailureRule:
        """Answer the next ``count`` requests to ``endpoint`` with ``status`` (``count=None``: until cleared)."""
        self._check_endpoint(endpoint)
        rule = FailureRule(endpoint=endpoint, count=count, status=status, method=method)
        if message is not None:
            rule.message = message
        with self._state_lock:
            self._rules.append(rule)
        return rule

    def drop_next(
        self,
        endpoint: str = "any",
        *,
        count: int | None = 1,
        after_bytes: int = 0,
        during: str = "request",
        method: str | None = None,
    ) -> FailureRule:
        """Drop the connection of the next ``count`` requests to ``endpoint`` (see the module docstring)."""
        self._check_endpoint(endpoint)
        if during not in ("request", "response"):
            raise ValueError("during must be 'request' or 'response'")
        rule = FailureRule(
            endpoint=endpoint, count=count, drop=True, after_bytes=after_bytes, during=during, method=method
        )
        with self._state_lock:
            self._rules.append(rule)
        return rule

    def clear_failures(self) -> None:
        with self._state_lock:
            self._rules.clear()

    @staticmethod
    def _check_endpoint(endpoint: str) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")

    def _take_failure(self, endpoint: str, method: str) -> FailureRule | None:
        with self._state_lock:
            for rule in self._rules:
                if rule.matches(endpoint, method):
                    if rule.count is not None:
                        rule.count -= 1
                    rule.hits += 1
                    return rule
        return None

    def _record(self, record: RequestRecord) -> int:
        with self._state_lock:
            self.requests.append(record)
            return len(self.requests) - 1

    def _record_status(self, index: int, status: int) -> None:
        with self._state_lock:
            self.requests[index] = self.requests[index]._replace(status=status)

    def requests_to(self, endpoint: str) -> list[RequestRecord]:
        """Recorded requests whose endpoint name is ``endpoint``."""
        with self._state_lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    # ---- inspection helpers (no HTTP)
    def _repo(self, repo_id: str, repo_type: str) -> dict:
        repo = self.storage.load_repo(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def branch_head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str | None:
        repo = self.storage.load_repo(repo_type, repo_id)
        return None if repo is None else repo["branches"].get(branch)

    def _tree_at(self, repo_id: str, revision: str, repo_type: str) -> dict:
        repo = self._repo(repo_id, repo_type)
        sha = self.storage.resolve(repo, revision)
        if sha is None:
            raise KeyError(f"no revision {revision!r} in {repo_id!r}")
        return self.storage.load_commit(repo, sha)["tree"]

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return sorted(self._tree_at(repo_id, revision, repo_type))

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        entry = self._tree_at(repo_id, revision, repo_type)[path]
        return self.storage.entry_path(entry).read_bytes()

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        repo = self._repo(repo_id, repo_type)
        sha = self.storage.resolve(repo, revision)
        return [
            {k: v for k, v in c.items() if k != "tree"} | {"files": sorted(c["tree"])}
            for c in self.storage.history(repo, sha)
        ]

    def lfs_objects(self) -> set[str]:
        return {p.name for p in (self.root / "lfs").glob("*/*") if _SHA256_RE.match(p.name)}

    # ---- seeding through the HTTP API (same code path as a client)
    def _call(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> Any:
        hdrs = {"Authorization": f"Bearer {next(iter(self.tokens))}", **(headers or {})}
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path} -> {resp.status}: {data[:500]!r}")
        return json.loads(data) if data else None

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        message: str = "seed",
        branch: str = "main",
        private: bool = False,
        repo_type: str = "model",
    ) -> str:
        """Put ``files`` ({path: bytes}) on ``branch`` of ``repo_id`` in one commit; returns the commit id.

        Creates the repo (and the branch, from ``main``) if needed. Runs in the test process and goes
        through the server's HTTP endpoints (preupload decides LFS vs regular, LFS batch + PUT, NDJSON
        commit), so the result is exactly what a client upload would produce. The server must be running.
        """
        api = f"/api/{repo_type}s/{repo_id}"
        if self.storage.load_repo(repo_type, repo_id) is None:
            ns, name = repo_id.split("/")
            body = {"name": name, "organization": ns, "type": repo_type}
            self._call("POST", "/api/repos/create", body | ({"visibility": "private"} if private else {}))
        if self.branch_head(repo_id, branch, repo_type) is None:
            self._call("POST", f"{api}/branch/{quote(branch, safe='')}", {})
        rev = quote(branch, safe="")
        modes = self._call(
            "POST", f"{api}/preupload/{rev}", {"files": [{"path": p, "size": len(d)} for p, d in files.items()]}
        )
        lines = [{"key": "header", "value": {"summary": message, "description": ""}}]
        for info in modes["files"]:
            data = files[info["path"]]
            if info["uploadMode"] == "lfs" and data:
                oid = hashlib.sha256(data).hexdigest()
                if self.storage.lfs_size(oid) is None:
                    self._call("PUT", f"/__lfs/objects/{oid}", data)
                value = {"path": info["path"], "algo": "sha256", "oid": oid, "size": len(data)}
                lines.append({"key": "lfsFile", "value": value})
            else:
                content = base64.b64encode(data).decode()
                lines.append({"key": "file", "value": {"path": info["path"], "content": content, "encoding": "base64"}})
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        answer = self._call("POST", f"{api}/commit/{rev}", body, {"Content-Type": "application/x-ndjson"})
        return answer["commitOid"]

    # ---- routing
    def _route(self, method: str, seg: list[str]) -> tuple[str, Callable | None, dict]:
        """Map a request to (endpoint name, handler, kwargs). Unknown -> ("unknown", None, {})."""
        none = ("unknown", None, {})
        n = len(seg)
        if n >= 2 and seg[0] == "api":
            if seg[1:] == ["whoami-v2"] and method == "GET":
                return "whoami", _api_whoami, {}
            if seg[1:] == ["repos", "create"] and method == "POST":
                return "create_repo", _api_create_repo, {}
            if seg[1:] == ["repos", "delete"] and method == "DELETE":
                return "delete_repo", _api_delete_repo, {}
            if seg[1:] == ["validate-yaml"] and method == "POST":
                return "validate_yaml", _api_validate_yaml, {}
            if n >= 4 and seg[1] in _REPO_TYPES:
                kw = {"repo_type": _REPO_TYPES[seg[1]], "repo_id": f"{seg[2]}/{seg[3]}"}
                rest = seg[4:]
                if not rest and method == "GET":
                    return "repo_info", _api_repo_info, {**kw, "revision": None}
                if len(rest) == 2 and rest[0] == "revision" and method == "GET":
                    return "repo_info", _api_repo_info, {**kw, "revision": rest[1]}
                if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                    return "tree", _api_tree, {**kw, "revision": rest[1], "path": "/".join(rest[2:])}
                if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
                    return "paths_info", _api_paths_info, {**kw, "revision": rest[1]}
                if rest == ["refs"] and method == "GET":
                    return "refs", _api_refs, kw
                if len(rest) == 2 and rest[0] == "commits" and method == "GET":
                    return "commits", _api_commits, {**kw, "revision": rest[1]}
                if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
                    return "branch", _api_branch, {**kw, "branch": rest[1]}
                if len(rest) == 2 and rest[0] == "tag" and method in ("POST", "DELETE"):
                    return "tag", _api_tag, {**kw, "name": rest[1]}
                if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                    return "preupload", _api_preupload, {**kw, "revision": rest[1]}
                if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                    return "commit", _api_commit, {**kw, "revision": rest[1]}
            return none
        if n == 3 and seg[0] == "__lfs":
            if seg[1] == "objects" and method == "PUT":
                return "lfs_upload", _lfs_upload, {"oid": seg[2]}
            if seg[1] == "objects" and method in ("GET", "HEAD"):
                return "lfs_download", _lfs_download, {"oid": seg[2]}
            if seg[1] == "verify" and method == "POST":
                return "lfs_verify", _lfs_verify, {"oid": seg[2]}
            return none
        repo_type = "model"
        if n and seg[0] in ("datasets", "spaces"):
            repo_type, seg = _REPO_TYPES[seg[0]], seg[1:]
            n = len(seg)
        if n == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                return "lfs_batch", _lfs_batch, {"repo_type": repo_type, "repo_id": f"{seg[0]}/{seg[1][:-4]}"}
            return none
        if n >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            kw = {"repo_type": repo_type, "repo_id": f"{seg[0]}/{seg[1]}", "revision": seg[3]}
            return "resolve", _resolve, {**kw, "path": "/".join(seg[4:])}
        return none


# --------------------------------------------------------------------------------------------------------
# route handlers: (handler, **kwargs) -> None; they either send a response or raise HubError
# --------------------------------------------------------------------------------------------------------


def _user(h: _Handler) -> str | None:
    """User of the request's token; None if anonymous; 401 if the token is unknown."""
    auth = h.headers.get("Authorization") or ""
    if not auth:
        return None
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
    user = h.server.hub.tokens.get(token)
    if user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    return user


def _require_user(h: _Handler) -> str:
    user = _user(h)
    if user is None:
        raise HubError(401, "You must be authenticated to access this resource (no token sent)")
    return user


def _get_repo(h: _Handler, repo_type: str, repo_id: str, write: bool = False) -> tuple[dict, str | None]:
    user = _require_user(h) if write else _user(h)
    repo = h.server.hub.storage.load_repo(repo_type, repo_id)
    if repo is None or (repo["private"] and user is None):
        raise HubError(404, "Repository not found", code="RepoNotFound")
    return repo, user


def _get_commit(h: _Handler, repo: dict, revision: str) -> dict:
    storage = h.server.hub.storage
    sha = storage.resolve(repo, revision)
    if sha is None:
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    return storage.load_commit(repo, sha)


def _repo_url(h: _Handler, repo: dict) -> str:
    return f"{h.base_url()}/{_URL_PREFIX[repo['type']]}{repo['id']}"


def _api_whoami(h: _Handler) -> None:
    user = _user(h)
    if user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    hub = h.server.hub
    h.send_json(
        {
            "type": "user",
            "id": hashlib.sha1(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user,
            "email": f"{user}@example.invalid",
            "emailVerified": True,
            "isPro": False,
            "canPay": False,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in hub.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hub_server", "role": "write"}},
        }
    )


def _api_create_repo(h: _Handler) -> None:
    user = _require_user(h)
    body = h.read_json() or {}
    name, org = body.get("name"), body.get("organization") or user
    repo_type = body.get("type") or "model"
    if repo_type not in _URL_PREFIX:
        raise HubError(400, f"Invalid repo type: {repo_type}")
    if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(org) or ".." in name:
        raise HubError(400, f"Invalid repo name: {org}/{name}")
    repo_id = f"{org}/{name}"
    storage = h.server.hub.storage
    with storage.lock:
        existing = storage.load_repo(repo_type, repo_id)
        if existing is not None:
            # the client reads "url" from this 409 answer when called with exist_ok=True
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": _repo_url(h, existing)})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = storage.create_repo(repo_type, repo_id, private, user)
    h.send_json({"url": _repo_url(h, repo), "name": repo_id, "id": repo_id})


def _api_delete_repo(h: _Handler) -> None:
    user = _require_user(h)
    body = h.read_json() or {}
    repo_id = f"{body.get('organization') or user}/{body.get('name')}"
    storage = h.server.hub.storage
    with storage.lock:
        repo = storage.load_repo(body.get("type") or "model", repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        storage.delete_repo(repo)
    h.send_json({})


def _api_validate_yaml(h: _Handler) -> None:
    _user(h)  # anonymous is fine (ModelCard.validate sends no token); an unknown token is still a 401
    h.read_json()
    h.send_json({"errors": [], "warnings": []})


def _api_repo_info(h: _Handler, repo_type: str, repo_id: str, revision: str | None) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id)
    commit = _get_commit(h, repo, revision or "main")
    with_blobs = _as_bool((h.query.get("blobs") or [None])[0])
    siblings = []
    for path in sorted(commit["tree"]):
        entry = commit["tree"][path]
        sibling: dict[str, Any] = {"rfilename": path}
        if with_blobs:
            sibling.update(size=entry["size"], blobId=entry["oid"])
            if entry.get("lfs"):
                lfs = entry["lfs"]
                sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
        siblings.append(sibling)
    ns = repo_id.split("/")[0]
    info = {
        "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
        "id": repo_id,
        "author": ns,
        "sha": commit["id"],
        "lastModified": commit["date"],
        "createdAt": repo["createdAt"],
        "private": repo["private"],
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(e["size"] for e in commit["tree"].values()),
    }
    if repo_type == "model":
        info["modelId"] = repo_id
    h.send_json(info)


def _last_commit_json(storage: _Storage, repo: dict, head: dict, paths: list[str]) -> dict[str, dict]:
    """For each path, the newest commit (first-parent history) that changed it."""
    found: dict[str, dict] = {}
    remaining = set(paths)
    for commit in storage.history(repo, head["id"]):
        parent = storage.load_commit(repo, commit["parents"][0]) if commit["parents"] else None
        for path in list(remaining):
            if _signature(commit["tree"], path) != _signature(parent and parent["tree"], path):
                found[path] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
                remaining.discard(path)
        if not remaining:
            break
    return found


def _api_tree(h: _Handler, repo_type: str, repo_id: str, revision: str, path: str) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id)
    commit = _get_commit(h, repo, revision)
    tree = commit["tree"]
    recursive = _as_bool((h.query.get("recursive") or [None])[0])
    expand = _as_bool((h.query.get("expand") or [None])[0])
    path = path.strip("/")
    dirs = _dir_paths(tree)
    if path and path not in dirs:
        if path in tree:
            raise HubError(400, f"{path} is a file, not a folder")
        raise HubError(404, f"Path {path} not found at {revision}", code="EntryNotFound")
    prefix = path + "/" if path else ""

    def in_scope(p: str) -> bool:
        return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

    items = [_dir_json(tree, d) for d in dirs if in_scope(d)]
    items += [_file_json(p, e) for p, e in tree.items() if in_scope(p)]
    items.sort(key=lambda item: item["path"])
    if expand:
        last = _last_commit_json(h.server.hub.storage, repo, commit, [i["path"] for i in items])
        for item in items:
            item["lastCommit"] = last.get(item["path"])
    h.send_json(items)


def _api_paths_info(h: _Handler, repo_type: str, repo_id: str, revision: str) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id)
    body = h.read_body()
    ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip()
    if ctype == "application/json":
        data = json.loads(body or b"{}")
        paths, expand = list(data.get("paths") or []), bool(data.get("expand"))
    else:
        form = parse_qs(body.decode(), keep_blank_values=True)
        paths, expand = form.get("paths", []), _as_bool((form.get("expand") or [None])[0])
    commit = _get_commit(h, repo, revision)
    tree, dirs = commit["tree"], _dir_paths(commit["tree"])
    items = []
    for p in dict.fromkeys(x.strip("/") for x in paths):
        if p in tree:
            items.append(_file_json(p, tree[p]))
        elif p in dirs:
            items.append(_dir_json(tree, p))
    if expand:
        last = _last_commit_json(h.server.hub.storage, repo, commit, [i["path"] for i in items])
        for item in items:
            item["lastCommit"] = last.get(item["path"])
    h.send_json(items)


def _api_refs(h: _Handler, repo_type: str, repo_id: str) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id)

    def refs(table: str, kind: str) -> list[dict]:
        return [
            {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
            for name, sha in sorted(repo[table].items())
        ]

    h.send_json(
        {"branches": refs("branches", "heads"), "converts": [], "tags": refs("tags", "tags"), "pullRequests": []}
    )


def _api_commits(h: _Handler, repo_type: str, repo_id: str, revision: str) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id)
    head = _get_commit(h, repo, revision)
    formatted = "formatted" in (h.query.get("expand[]") or []) + (h.query.get("expand") or [])
    out = []
    for c in h.server.hub.storage.history(repo, head["id"]):
        item = {
            "id": c["id"],
            "title": c["title"],
            "message": c["message"],
            "date": c["date"],
            "authors": [{"user": c["author"], "avatar": ""}],
            "parents": c["parents"],
        }
        if formatted:
            item["formatted"] = {"title": c["title"], "message": c["message"]}
        out.append(item)
    h.send_json(out)


def _api_branch(h: _Handler, repo_type: str, repo_id: str, branch: str) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id, write=True)
    storage = h.server.hub.storage
    body = h.read_json() if h.command == "POST" else h.read_body()
    with storage.lock:
        repo = storage.load_repo(repo_type, repo_id)
        if h.command == "DELETE":
            if branch not in repo["branches"]:
                raise HubError(404, f"Branch {branch} not found", code="RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo["branches"][branch]
            storage.save_repo(repo)
            return h.send_json({})
        if not branch or not _valid_repo_path(branch) or branch in repo["tags"]:
            raise HubError(400, f"Invalid branch name: {branch}")
        if branch in repo["branches"]:
            raise HubError(409, "Reference already exists")
        start = (body or {}).get("startingPoint") or "main"
        sha = storage.resolve(repo, start)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {start}", code="RevisionNotFound")
        repo["branches"][branch] = sha
        storage.save_repo(repo)
    h.send_json({})


def _api_tag(h: _Handler, repo_type: str, repo_id: str, name: str) -> None:
    _get_repo(h, repo_type, repo_id, write=True)
    storage = h.server.hub.storage
    body = h.read_json() if h.command == "POST" else h.read_body()
    with storage.lock:
        repo = storage.load_repo(repo_type, repo_id)
        if h.command == "DELETE":
            if name not in repo["tags"]:
                raise HubError(404, f"Tag {name} not found", code="RevisionNotFound")
            del repo["tags"][name]
            storage.save_repo(repo)
            return h.send_json({})
        tag = (body or {}).get("tag")
        if not isinstance(tag, str) or not _valid_repo_path(tag):
            raise HubError(400, f"Invalid tag name: {tag}")
        if tag in repo["tags"]:
            raise HubError(409, "Tag already exists")
        sha = storage.resolve(repo, name)  # `name` is the revision to tag here
        if sha is None:
            raise HubError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
        repo["tags"][tag] = sha
        storage.save_repo(repo)
    h.send_json({})


def _upload_mode(hub: HubServer, path: str, size: int) -> str:
    name = path.rsplit("/", 1)[-1]
    if size > hub.lfs_threshold or any(fnmatch.fnmatch(name, pat) for pat in hub.lfs_patterns):
        return "lfs"
    return "regular"


def _api_preupload(h: _Handler, repo_type: str, repo_id: str, revision: str) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id, write=True)
    body = h.read_json() or {}
    if h.query.get("create_pr"):
        raise HubError(400, "create_pr is not supported by hub_server")
    commit = _get_commit(h, repo, revision)
    hub, files = h.server.hub, []
    for f in body.get("files") or []:
        path, size = f.get("path"), f.get("size")
        if not isinstance(path, str) or not isinstance(size, int):
            raise HubError(400, "Malformed preupload request")
        entry = commit["tree"].get(path)
        oid = None
        if entry is not None:
            oid = entry["lfs"]["oid"] if entry.get("lfs") else entry["oid"]
        files.append({"path": path, "uploadMode": _upload_mode(hub, path, size), "shouldIgnore": False, "oid": oid})
    h.send_json({"files": files, "commitOid": commit["id"]})


def _api_commit(h: _Handler, repo_type: str, repo_id: str, revision: str) -> None:
    repo, user = _get_repo(h, repo_type, repo_id, write=True)
    body = h.read_body()
    if _as_bool((h.query.get("create_pr") or [None])[0]):
        raise HubError(400, "create_pr is not supported by hub_server")
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except ValueError as exc:
        raise HubError(400, f"Invalid NDJSON body: {exc}") from None
    hub, storage = h.server.hub, h.server.hub.storage
    with storage.lock:
        repo = storage.load_repo(repo_type, repo_id)
        branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
        if branch not in repo["branches"]:
            if storage.resolve(repo, revision) is not None:
                raise HubError(400, f"Can only commit to a branch, not to {revision}")
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        head = storage.load_commit(repo, repo["branches"][branch])
        tree = dict(head["tree"])
        header, new_blobs, missing_lfs = None, [], []
        # 1. validate every operation; nothing is written yet
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path")
            if key == "header":
                header = value
                continue
            if not isinstance(path, str) or not _valid_repo_path(path.rstrip("/") if key == "deletedFolder" else path):
                raise HubError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") == "base64":
                    try:
                        data = base64.b64decode(value.get("content") or "", validate=True)
                    except (binascii.Error, ValueError):
                        raise HubError(400, f"Invalid base64 content for {path}") from None
                else:
                    data = (value.get("content") or "").encode()
                if len(data) > hub.lfs_threshold:
                    too_big = f"{path} is larger than {hub.lfs_threshold} bytes: it must be uploaded with LFS"
                    raise HubError(400, too_big)
                new_blobs.append(data)
                tree[path] = {"oid": git_blob_sha1(data), "size": len(data), "lfs": None}
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                stored = storage.lfs_size(oid) if isinstance(oid, str) else None
                if value.get("algo", "sha256") != "sha256" or stored is None or (size is not None and size != stored):
                    missing_lfs.append(path)
                    continue
                pointer = lfs_pointer(oid, stored)
                tree[path] = {
                    "oid": git_blob_sha1(pointer),
                    "size": stored,
                    "lfs": {"oid": oid, "size": stored, "pointerSize": len(pointer)},
                }
            elif key == "deletedFile":
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation key: {key!r}")
        if missing_lfs:
            raise HubError(
                400,
                "Your push was rejected because an LFS pointer pointed to a file that does not exist. "
                "Offending file(s): " + ", ".join(missing_lfs),
            )
        if header is None or not (header.get("summary") or "").strip():
            raise HubError(400, "Commit header with a non-empty summary is required")
        parent = header.get("parentCommit")
        if parent and parent != head["id"] and not (len(parent) < 40 and head["id"].startswith(parent)):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        for path in tree:  # a file cannot also be a folder
            if any(p in tree for p in _dir_paths({path: None})):
                raise HubError(400, f"{path} conflicts with a file of the same name as one of its folders")
        # 2. store content, then the commit object, then move the ref (the only visible step)
        for data in new_blobs:
            storage.put_blob(data)
        commit = storage.write_commit(
            repo, [head["id"]], tree, header["summary"].strip(), header.get("description") or "", user
        )
        repo["branches"][branch] = commit["id"]
        storage.save_repo(repo)
    h.send_json(
        {
            "success": True,
            "commitOid": commit["id"],
            "commitUrl": f"{_repo_url(h, repo)}/commit/{commit['id']}",
            "pullRequestUrl": None,
            "hookOutput": "",
        }
    )


def _lfs_batch(h: _Handler, repo_type: str, repo_id: str) -> None:
    body = h.read_json() or {}
    operation = body.get("operation")
    repo, _ = _get_repo(h, repo_type, repo_id, write=operation == "upload")
    storage, base = h.server.hub.storage, h.base_url()
    objects = []
    for obj in body.get("objects") or []:
        oid, size = obj.get("oid"), obj.get("size")
        out: dict[str, Any] = {"oid": oid, "size": size}
        if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            out["error"] = {"code": 422, "message": "Invalid oid or size"}
            out["oid"], out["size"] = str(oid), size if isinstance(size, int) else -1
            objects.append(out)
            continue
        stored = storage.lfs_size(oid)
        if operation == "upload":
            if stored is None:
                out["authenticated"] = True
                out["actions"] = {
                    "upload": {"href": f"{base}/__lfs/objects/{oid}"},
                    "verify": {"href": f"{base}/__lfs/verify/{oid}"},
                }
            elif stored != size:
                out["error"] = {"code": 422, "message": f"Object {oid} exists with size {stored}, not {size}"}
        elif operation == "download":
            if stored is None:
                out["error"] = {"code": 404, "message": "Object does not exist"}
            else:
                out["actions"] = {"download": {"href": f"{base}/__lfs/objects/{oid}"}}
        else:
            raise HubError(400, f"Unknown LFS operation: {operation!r}")
        objects.append(out)
    answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
    h.send_json(answer, content_type="application/vnd.git-lfs+json")


def _lfs_upload(h: _Handler, oid: str) -> None:
    if not _SHA256_RE.match(oid):
        raise HubError(400, "Invalid LFS oid")
    storage = h.server.hub.storage
    expected = h.headers.get("Content-Length")
    tmp = storage.root / "tmp" / f"{oid}.{uuid.uuid4().hex}"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in h._body_chunks():
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if expected is not None and int(expected) != size:
            raise HubError(400, f"Body has {size} bytes, Content-Length said {expected}")
        if digest.hexdigest() != oid:
            raise HubError(400, f"sha256 mismatch: body hashes to {digest.hexdigest()}, not {oid}")
        target = storage.lfs_path(oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    h.send_bytes(200, b"", {"ETag": f'"{hashlib.md5(oid.encode()).hexdigest()}"'}, content_type="text/plain")


def _lfs_download(h: _Handler, oid: str) -> None:
    storage = h.server.hub.storage
    size = storage.lfs_size(oid)
    if size is None:
        raise HubError(404, "Object does not exist")
    h.send_file(200, storage.lfs_path(oid), 0, size, {"Content-Type": "application/octet-stream"})


def _lfs_verify(h: _Handler, oid: str) -> None:
    _require_user(h)
    body = h.read_json() or {}
    stored = h.server.hub.storage.lfs_size(oid)
    if stored is None or body.get("oid") not in (None, oid) or body.get("size") not in (None, stored):
        raise HubError(404, f"Object {oid} with size {body.get('size')} was not uploaded")
    h.send_json({"success": True})


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` -> (start, end_inclusive); None: no (usable) range; raises 416."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: ignored, like many servers (full 200 answer)
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
        start, end = max(size - int(m.group(2)), 0), size - 1
    if start >= size or start > end:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _resolve(h: _Handler, repo_type: str, repo_id: str, revision: str, path: str) -> None:
    repo, _ = _get_repo(h, repo_type, repo_id)
    commit = _get_commit(h, repo, revision)
    entry = commit["tree"].get(path)
    if entry is None:
        raise HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
    size = entry["size"]
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Repo-Commit": commit["id"],
        "ETag": f'"{entry["oid"]}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{path.rsplit("/", 1)[-1]}"',
    }
    if entry.get("lfs"):
        headers["X-Linked-Etag"] = f'"{entry["lfs"]["oid"]}"'
        headers["X-Linked-Size"] = str(entry["lfs"]["size"])
    rng = _parse_range(h.headers.get("Range"), size) if size else None
    if rng is None:
        h.send_file(200, h.server.hub.storage.entry_path(entry), 0, size, headers)
    else:
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        h.send_file(206, h.server.hub.storage.entry_path(entry), start, end - start + 1, headers)


# --------------------------------------------------------------------------------------------------------
# running client code in a subprocess
# --------------------------------------------------------------------------------------------------------

_RESULT_MARKER = "@@HUB_CLIENT_RESULT@@"
_PRELUDE = f"""\
import json as _json
def emit(obj):
    print({_RESULT_MARKER!r} + _json.dumps(obj, default=str), flush=True)
"""


def run_client(
    code: str, env: dict[str, str], *, timeout: float = 120, cwd: str | os.PathLike | None = None, check: bool = True
) -> Any:
    """Run ``code`` with ``sys.executable`` in a subprocess with ``env`` and return what it ``emit()``-ed.

    ``emit(obj)`` is predefined in the snippet; the value of its last call is returned (JSON round trip),
    ``None`` if it never called it. With ``check=True`` a non-zero exit raises ``AssertionError`` with the
    subprocess's output (so the test shows the client-side traceback).
    """
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"client subprocess failed (exit {proc.returncode})\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}"
        )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            result = json.loads(line[len(_RESULT_MARKER):])
    return result
