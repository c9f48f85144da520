"""A Hugging Face Hub-compatible HTTP server for the publishing tests (stdlib only).

The tests drive the REAL ``huggingface_hub`` client (and transformers / timm, which download through it)
against this server on ``127.0.0.1``; nothing is mocked on the client side. The server implements what
``VCRegTrainer`` publishing and the standard loaders use (measured: the requests huggingface_hub 2.4 sends in
``test_publishing.py`` and ``test_kill.py``), plus failure injection:

    server = HubServer(root=tmp_path / "hub")            # on-disk storage
    server.start()                                       # 127.0.0.1, a free port; ``with HubServer(...)`` too
    env = server.client_env(hf_home=tmp_path / "hf_home")   # environment of a client subprocess
    server.fail_next("commit", status=500)               # the next commit answers HTTP 500 (count=None: all)
    server.stop(); server.start()                        # same port, same data ("server down")
    server.branch_head("org/name"), server.list_files(...), server.read_file(...), server.history(...),
    server.lfs_objects(), server.requests, server.requests_to("commit")   # inspection, no HTTP

Clients must run in a subprocess started with :meth:`HubServer.client_env` (fixture ``hub_env``):
huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET`` and ``HF_HOME`` when it is imported, and the test
process imported it long ago. ``HF_HUB_DISABLE_XET=1`` makes the client upload through the LFS batch API
(``hf_xet`` is installed and would otherwise send every file to Xet storage, which this server lacks).

Endpoints (names are those of ``fail_next`` and ``RequestRecord.endpoint``; anything else: 404, ``"unknown"``)

    create_repo    POST     /api/repos/create                          409 + "url" if it exists (exist_ok)
    validate_yaml  POST     /api/validate-yaml                         model card metadata: always valid
    repo_info      GET      /api/models/{ns}/{name}[/revision/{rev}]   model_info / repo_info
    preupload      POST     /api/models/{ns}/{name}/preupload/{rev}    upload mode of each file
    commit         POST     /api/models/{ns}/{name}/commit/{rev}       NDJSON: header, file, lfsFile
    lfs_batch      POST     /{ns}/{name}.git/info/lfs/objects/batch    upload actions for missing objects
    lfs_upload     PUT      /__lfs/objects/{sha256}                    no auth, like a presigned S3 URL
    lfs_verify     POST     /__lfs/verify/{sha256}
    resolve        HEAD|GET /{ns}/{name}/resolve/{rev}/{path}          file download (no Range)

Semantics: model repos only, all public, one branch ``main``; a revision is ``main`` or a full commit id.
``create_repo`` commits ``.gitattributes`` (like the Hub). One token, ``hf_test_token`` (user ``test-user``): a
request with another token gets 401, a write without a token too. Files matching ``LFS_PATTERNS`` or larger
than 10 MiB go through LFS. A commit is atomic: every operation is checked first (an ``lfsFile`` whose object
was never uploaded -> 400, nothing changes), then blobs and the commit object are written, and only then does
``main`` move (one ``os.replace``). Regular files have their git blob sha1 as ``oid``/``ETag``; LFS files the
sha1 of their pointer file, with the sha256 in ``X-Linked-Etag`` (as on the Hub, so the client's cache works).
Missing repos, revisions and files answer 404 with ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), from which the client raises its specific errors.

Client quirk: the LFS PUT, batch and verify calls and the preupload call go through ``http_backoff``, which
retries 5xx and connection errors up to 5 times (sleeps 1, 2, 4, 8, 8 s); use a 4xx, or fail ``commit``
(posted once), to make a push fail fast.

Storage (on disk, every file written to a temp file then ``os.replace``-d; a restarted server sees it all)::

    root/lfs/<sha256[:2]>/<sha256>        LFS objects, shared by all repos
    root/blobs/<sha1[:2]>/<sha1>          regular file contents
    root/repos/<ns>/<name>/repo.json      {"id", "createdAt", "head"}
    root/repos/<ns>/<name>/commits/<sha>.json   {"id", "parents", "title", "message", "date", "author",
                                                 "tree": {path: {"oid", "size", "lfs": {...} | None}}}
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import socket
import threading
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from urllib.parse import unquote, urlsplit

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "FailureRule", "HubServer", "RequestRecord"]

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "test-user"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.npy",
                "*.npz", "*.pkl")
LFS_THRESHOLD = 10 * 1024 * 1024  # bytes; larger files go through LFS whatever their name
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


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
    tmp.write_bytes(data)
    os.replace(tmp, path)


class HubError(Exception):
    """Raised by route handlers; sent as ``{"error": message, **extra}`` with ``X-Error-Code``/``-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


class RequestRecord(NamedTuple):
    method: str
    path: str
    endpoint: str
    status: int | None  # None while in progress, or when the connection broke before a status line


@dataclass
class FailureRule:
    """Answer the next ``count`` requests to ``endpoint`` (None: until cleared) with ``status``."""

    endpoint: str
    count: int | None
    status: int = 500
    hits: int = 0


# -------------------------------------------------------------------------------------------------- storage
class _Storage:
    """On-disk repos, commits, blobs and LFS objects (layout in the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("lfs", "blobs", "repos", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()  # serialises repo creation and commits

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256[:2] / sha256

    def lfs_size(self, sha256: str) -> int | None:
        try:
            return self.lfs_path(sha256).stat().st_size if _SHA256_RE.match(sha256) else None
        except FileNotFoundError:
            return None

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self.entry_path({"oid": oid, "lfs": None})
        if not path.exists():
            _atomic_write(path, data)
        return oid

    def entry_path(self, entry: dict) -> Path:
        """Where the content of a tree entry is stored."""
        if entry["lfs"]:
            return self.lfs_path(entry["lfs"]["oid"])
        return self.root / "blobs" / entry["oid"][:2] / entry["oid"]

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def load_repo(self, repo_id: str) -> dict | None:
        try:
            return json.loads((self.repo_dir(repo_id) / "repo.json").read_bytes())
        except FileNotFoundError:
            return None

    def save_repo(self, repo: dict) -> None:
        _atomic_write(self.repo_dir(repo["id"]) / "repo.json", json.dumps(repo).encode())

    def create_repo(self, repo_id: str, author: str) -> dict:
        attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
        repo = {"id": repo_id, "createdAt": _now_iso()}
        tree = {".gitattributes": {"oid": self.put_blob(attrs), "size": len(attrs), "lfs": None}}
        repo["head"] = self.write_commit(repo, [], tree, "initial commit", "", author)["id"]
        self.save_repo(repo)
        return repo

    def write_commit(self, repo: dict, parents: list[str], tree: dict, title: str, message: str, author: str):
        date, salt = _now_iso(), uuid.uuid4().hex
        payload = json.dumps([parents, sorted(tree.items()), title, message, date, author, salt])
        commit = {"id": hashlib.sha1(payload.encode()).hexdigest(), "parents": parents, "title": title,
                  "message": message, "date": date, "author": author, "tree": tree}
        _atomic_write(self.repo_dir(repo["id"]) / "commits" / f"{commit['id']}.json", json.dumps(commit).encode())
        return commit

    def load_commit(self, repo: dict, revision: str) -> dict | None:
        """The commit at ``revision``: ``main`` or a full commit id (None if there is none)."""
        sha = repo["head"] if revision == "main" else revision
        if not _SHA1_RE.match(sha):
            return None
        try:
            return json.loads((self.repo_dir(repo["id"]) / "commits" / f"{sha}.json").read_bytes())
        except FileNotFoundError:
            return None

    def history(self, repo: dict) -> Iterator[dict]:
        """The commits of ``main``, newest first."""
        commit = self.load_commit(repo, "main")
        while commit is not None:
            yield commit
            commit = self.load_commit(repo, commit["parents"][0]) if commit["parents"] else None


# -------------------------------------------------------------------------------------------------- HTTP layer
class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the client's upload threads connect at once

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
        """Close kept-alive connections, so a stopped server really refuses the client."""
        with self.connections_lock:
            conns = list(self.open_connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries Content-Length
    server: _HTTPServer

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def log_message(self, format, *args):  # noqa: A002 - silence stderr; see HubServer.requests
        pass

    # -- request body (Content-Length; the client never sends a chunked body here)
    def body_chunks(self) -> Iterator[bytes]:
        left = 0 if self._body_done else int(self.headers.get("Content-Length") or 0)
        while left:
            data = self.rfile.read(min(left, _CHUNK))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(data)
            yield data
        self._body_done = True

    def read_body(self) -> bytes:
        return b"".join(self.body_chunks())

    def read_json(self) -> Any:
        try:
            return json.loads(self.read_body() or b"null")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from None

    # -- responses
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.server.server_address[1]}'}"

    def _start_response(self, status: int, headers: dict, length: int) -> None:
        # record the status before any byte reaches the client, so the log is final once the client sees it
        self.server.hub._record_status(self._record_index, status)
        self._started = True
        if not self._body_done:  # answered before the body was read (an error): don't parse it as a request
            self.close_connection = True
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def send_json(self, obj: Any, status: int = 200, headers: dict | None = None, content_type="application/json"):
        body = json.dumps(obj).encode()
        self._start_response(status, {"Content-Type": content_type, **(headers or {})}, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_file(self, path: Path, size: int, headers: dict) -> None:
        self._start_response(200, headers, size)
        if self.command != "HEAD":
            with open(path, "rb") as f:
                while data := f.read(_CHUNK):
                    self.wfile.write(data)

    def send_error_json(self, err: HubError) -> None:
        headers = {**err.headers, "X-Error-Message": err.message.replace("\n", " ")[:500]}
        if err.code:
            headers["X-Error-Code"] = err.code
        self.send_json({"error": err.message, **err.extra}, err.status, headers)

    # -- dispatch
    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        self._body_done, self._started = not self.headers.get("Content-Length"), False
        url = urlsplit(self.path)
        endpoint, func, write, kwargs = "unknown", None, False, {}
        for name, methods, pattern, handler, needs_token in _ROUTES:
            match = pattern.fullmatch(url.path)
            if match and method in methods:
                endpoint, func, write = name, handler, needs_token
                kwargs = {k: None if v is None else unquote(v) for k, v in match.groupdict().items()}
                break
        self._record_index = hub._record(RequestRecord(method, self.path, endpoint, None))  # arrival order
        rule = hub._take_failure(endpoint)
        try:
            try:
                if rule is not None:
                    self.read_body()
                    raise HubError(rule.status, "Injected failure (hub_server test)")
                self.user = _user(self, write)  # like the Hub: a bad token gets 401 on any path
                if func is None:
                    raise HubError(404, f"Unknown endpoint: {method} {url.path}")
                func(self, **kwargs)
            except HubError as err:
                self.send_error_json(err)
        except (ConnectionError, OSError):  # the client went away (e.g. SIGKILLed mid-upload)
            self.close_connection = True
        except Exception as exc:  # a server bug: print it and answer 500 so that the test shows it
            traceback.print_exc()
            self.close_connection = True
            if not self._started:
                self.send_error_json(HubError(500, f"hub_server internal error: {exc!r}"))


# -------------------------------------------------------------------------------------------------- routes
def _user(h: _Handler, write: bool) -> str | None:
    """The request's user: None if anonymous (a write then gets 401); an unknown token gets 401."""
    auth = h.headers.get("Authorization") or ""
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
    if token and token != DEFAULT_TOKEN:
        raise HubError(401, "Invalid credentials in Authorization header")
    if write and not token:
        raise HubError(401, "You must be authenticated to access this resource (no token sent)")
    return DEFAULT_USER if token else None


def _get_repo(h: _Handler, repo_id: str) -> dict:
    repo = h.server.hub.storage.load_repo(repo_id)
    if repo is None:
        raise HubError(404, "Repository not found", code="RepoNotFound")
    return repo


def _get_commit(h: _Handler, repo: dict, revision: str) -> dict:
    commit = h.server.hub.storage.load_commit(repo, revision)
    if commit is None:
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    return commit


def _repo_url(h: _Handler, repo_id: str) -> str:
    return f"{h.base_url()}/{repo_id}"


def _api_create_repo(h: _Handler) -> None:
    body = h.read_json() or {}
    name, org = body.get("name"), body.get("organization") or h.user
    if (body.get("type") or "model") != "model":
        raise HubError(400, f"hub_server has model repos only, not {body['type']!r}")
    if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(org) or ".." in name:
        raise HubError(400, f"Invalid repo name: {org}/{name}")
    repo_id, storage = f"{org}/{name}", h.server.hub.storage
    with storage.lock:
        if storage.load_repo(repo_id) is not None:  # the client reads "url" from this 409 (exist_ok=True)
            raise HubError(409, "You already created this model repo", extra={"url": _repo_url(h, repo_id)})
        storage.create_repo(repo_id, h.user)
    h.send_json({"url": _repo_url(h, repo_id), "name": repo_id, "id": repo_id})


def _api_validate_yaml(h: _Handler) -> None:
    h.read_json()
    h.send_json({"errors": [], "warnings": []})


def _api_repo_info(h: _Handler, repo_id: str, revision: str | None) -> None:
    repo = _get_repo(h, repo_id)
    commit = _get_commit(h, repo, revision or "main")
    h.send_json({"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": commit["id"],
                 "lastModified": commit["date"], "createdAt": repo["createdAt"], "private": False, "gated": False,
                 "disabled": False, "tags": [], "siblings": [{"rfilename": path} for path in sorted(commit["tree"])]})


def _api_preupload(h: _Handler, repo_id: str, revision: str) -> None:
    commit = _get_commit(h, _get_repo(h, repo_id), revision)
    files = []
    for f in (h.read_json() or {}).get("files") or []:
        path, size, entry = f["path"], f["size"], commit["tree"].get(f["path"])
        lfs = size > LFS_THRESHOLD or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
        oid = None if entry is None else entry["lfs"]["oid"] if entry["lfs"] else entry["oid"]
        files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    h.send_json({"files": files, "commitOid": commit["id"]})


def _api_commit(h: _Handler, repo_id: str, revision: str) -> None:
    _get_repo(h, repo_id)
    lines = [json.loads(line) for line in h.read_body().splitlines() if line.strip()]
    storage = h.server.hub.storage
    with storage.lock:
        repo = storage.load_repo(repo_id)
        if revision != "main":
            raise HubError(404, f"Invalid rev id: {revision} (hub_server commits to main only)",
                           code="RevisionNotFound")
        head = storage.load_commit(repo, "main")
        tree, header, new_blobs, missing_lfs = dict(head["tree"]), None, [], []
        # 1. check every operation; nothing is written yet
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":  # huggingface_hub sends regular files base64-encoded
                data = base64.b64decode(value["content"])
                new_blobs.append(data)
                tree[value["path"]] = {"oid": git_blob_sha1(data), "size": len(data), "lfs": None}
            elif key == "lfsFile":
                oid, size = value["oid"], storage.lfs_size(value["oid"])
                if size is None or size != value.get("size", size):
                    missing_lfs.append(value["path"])
                    continue
                pointer = lfs_pointer(oid, size)
                tree[value["path"]] = {"oid": git_blob_sha1(pointer), "size": size,
                                       "lfs": {"oid": oid, "size": size, "pointerSize": len(pointer)}}
            else:
                raise HubError(400, f"hub_server does not implement the commit operation {key!r}")
        if missing_lfs:
            raise HubError(400, "Your push was rejected because an LFS pointer pointed to a file that does not "
                                "exist. Offending file(s): " + ", ".join(missing_lfs))
        if header is None or not (header.get("summary") or "").strip():
            raise HubError(400, "Commit header with a non-empty summary is required")
        # 2. store contents, then the commit object, then move main (the only visible step)
        for data in new_blobs:
            storage.put_blob(data)
        commit = storage.write_commit(repo, [head["id"]], tree, header["summary"].strip(),
                                      header.get("description") or "", h.user)
        repo["head"] = commit["id"]
        storage.save_repo(repo)
    h.send_json({"success": True, "commitOid": commit["id"], "commitUrl": f"{_repo_url(h, repo_id)}/commit/"
                 f"{commit['id']}", "pullRequestUrl": None, "hookOutput": ""})


def _lfs_batch(h: _Handler, repo_id: str) -> None:
    _get_repo(h, repo_id)
    body = h.read_json() or {}
    if body.get("operation") != "upload":
        raise HubError(400, f"hub_server implements LFS uploads only, not {body.get('operation')!r}")
    objects = []
    for obj in body.get("objects") or []:
        out = {"oid": obj["oid"], "size": obj["size"]}
        if h.server.hub.storage.lfs_size(obj["oid"]) is None:  # stored objects get no action: no upload
            base = f"{h.base_url()}/__lfs"
            out["authenticated"] = True
            out["actions"] = {"upload": {"href": f"{base}/objects/{obj['oid']}"},
                              "verify": {"href": f"{base}/verify/{obj['oid']}"}}
        objects.append(out)
    h.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                content_type="application/vnd.git-lfs+json")


def _lfs_upload(h: _Handler, oid: str) -> None:
    storage = h.server.hub.storage
    tmp, digest = storage.root / "tmp" / f"{oid}.{uuid.uuid4().hex}", hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in h.body_chunks():
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != oid:
            raise HubError(400, f"sha256 mismatch: body hashes to {digest.hexdigest()}, not {oid}")
        storage.lfs_path(oid).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, storage.lfs_path(oid))
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    h.send_json({})


def _lfs_verify(h: _Handler, oid: str) -> None:
    body, stored = h.read_json() or {}, h.server.hub.storage.lfs_size(oid)
    if stored is None or body.get("oid", oid) != oid or body.get("size", stored) != stored:
        raise HubError(404, f"Object {oid} with size {body.get('size')} was not uploaded")
    h.send_json({"success": True})


def _resolve(h: _Handler, repo_id: str, revision: str, path: str) -> None:
    commit = _get_commit(h, _get_repo(h, repo_id), revision)
    entry = commit["tree"].get(path)
    if entry is None:
        raise HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
    headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit["id"], "ETag": f'"{entry["oid"]}"'}
    if entry["lfs"]:
        headers["X-Linked-Etag"] = f'"{entry["lfs"]["oid"]}"'
        headers["X-Linked-Size"] = str(entry["lfs"]["size"])
    h.send_file(h.server.hub.storage.entry_path(entry), entry["size"], headers)


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
# (endpoint, methods, path pattern, handler, needs a token)
_ROUTES = [(name, methods, re.compile(pattern), handler, write) for name, methods, pattern, handler, write in (
    ("create_repo", ("POST",), r"/api/repos/create", _api_create_repo, True),
    ("validate_yaml", ("POST",), r"/api/validate-yaml", _api_validate_yaml, False),
    ("repo_info", ("GET",), rf"/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?", _api_repo_info, False),
    ("preupload", ("POST",), rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _api_preupload, True),
    ("commit", ("POST",), rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _api_commit, True),
    ("lfs_batch", ("POST",), rf"/{_REPO}\.git/info/lfs/objects/batch", _lfs_batch, True),
    ("lfs_upload", ("PUT",), r"/__lfs/objects/(?P<oid>[0-9a-f]{64})", _lfs_upload, False),
    ("lfs_verify", ("POST",), r"/__lfs/verify/(?P<oid>[0-9a-f]{64})", _lfs_verify, True),
    ("resolve", ("GET", "HEAD"), rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _resolve, False),
)]
ENDPOINTS = tuple(route[0] for route in _ROUTES)


# -------------------------------------------------------------------------------------------------- the server
class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1 storing under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.host, self.port = "127.0.0.1", 0
        self.storage = _Storage(self.root)
        self.requests: list[RequestRecord] = []
        self._rules: list[FailureRule] = []
        self._state_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubServer":
        """Start serving (on the previous port after a :meth:`stop`). Returns ``self``."""
        if self._httpd is None:
            self._httpd = _HTTPServer((self.host, self.port), _Handler, hub=self)
            self.port = self._httpd.server_address[1]
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"hub-server-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close kept-alive connections (the client gets "connection refused"); data stays."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.close_open_connections()
            httpd.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str | os.PathLike) -> dict[str, str]:
        """``os.environ`` for a client subprocess of this server (see the module docstring): ``HF_ENDPOINT``,
        ``HF_TOKEN``, Xet off, caches under ``hf_home``, offline/staging/other-token variables removed."""
        env = dict(os.environ)
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGINGFACE_CO_STAGING",
                    "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE", "HF_HUB_ENABLE_HF_TRANSFER",
                    "HF_XET_HIGH_PERFORMANCE", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
            env.pop(var, None)
        home = Path(hf_home)
        home.mkdir(parents=True, exist_ok=True)
        no_proxy = ",".join(x for x in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost") if x)
        env.update(HF_ENDPOINT=self.url, HF_TOKEN=DEFAULT_TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
                   HF_HUB_CACHE=str(home / "hub"), HF_XET_CACHE=str(home / "xet"), HF_ASSETS_CACHE=str(home / "assets"),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
                   DISABLE_TELEMETRY="1", NO_PROXY=no_proxy, no_proxy=no_proxy, PYTHONUNBUFFERED="1")
        return env

    # ---- failure injection and the request log
    def fail_next(self, endpoint: str, *, status: int = 500, count: int | None = 1) -> FailureRule:
        """Answer the next ``count`` requests to ``endpoint`` with ``status`` (``count=None``: until cleared).

        The request body is read and discarded; nothing is stored. ``rule.hits`` counts the answers given."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
        rule = FailureRule(endpoint=endpoint, count=count, status=status)
        with self._state_lock:
            self._rules.append(rule)
        return rule

    def clear_failures(self) -> None:
        with self._state_lock:
            self._rules.clear()

    def _take_failure(self, endpoint: str) -> FailureRule | None:
        with self._state_lock:
            for rule in self._rules:
                if rule.endpoint == endpoint and (rule.count is None or rule.count > 0):
                    rule.count = None if rule.count is None else rule.count - 1
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
        """Recorded requests to ``endpoint``, in arrival order."""
        with self._state_lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    # ---- inspection (no HTTP)
    def _repo(self, repo_id: str) -> dict:
        repo = self.storage.load_repo(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id!r}")
        return repo

    def branch_head(self, repo_id: str) -> str | None:
        """The commit id of ``main`` (None: no such repo)."""
        repo = self.storage.load_repo(repo_id)
        return None if repo is None else repo["head"]

    def list_files(self, repo_id: str) -> list[str]:
        return sorted(self.storage.load_commit(self._repo(repo_id), "main")["tree"])

    def read_file(self, repo_id: str, path: str) -> bytes:
        entry = self.storage.load_commit(self._repo(repo_id), "main")["tree"][path]
        return self.storage.entry_path(entry).read_bytes()

    def history(self, repo_id: str) -> list[dict]:
        """``[{id, parents, title, message, date, author, files}]`` of ``main``, newest first."""
        return [{k: v for k, v in c.items() if k != "tree"} | {"files": sorted(c["tree"])}
                for c in self.storage.history(self._repo(repo_id))]

    def lfs_objects(self) -> set[str]:
        """The sha256 of every stored LFS object."""
        return {p.name for p in (self.root / "lfs").glob("*/*") if _SHA256_RE.match(p.name)}
