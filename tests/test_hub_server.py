"""Tests of tests/hub_server.py.

Two kinds of tests:

* raw protocol tests talk HTTP to the server from this process (``http.client``) and pin down the wire
  format the Hub client relies on (headers, status codes, atomic commits);
* client tests run the REAL ``huggingface_hub`` client (and transformers / timm) in a subprocess whose
  environment points ``HF_ENDPOINT`` at the server (fixtures ``hub_server``, ``hub_env``, ``hub_run`` in
  conftest.py). huggingface_hub reads its settings at import time, hence the subprocesses.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
from pathlib import Path

import pytest

from hub_server import DEFAULT_TOKEN, DEFAULT_USER, HubServer, git_blob_sha1, lfs_pointer

REPO = "test-org/demo"


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def request(server: HubServer, method: str, path: str, body=None, headers=None, token=DEFAULT_TOKEN, chunked=False):
    """One HTTP request to the server; returns (status, headers (lower-case keys), body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def ndjson(*items) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def header(summary: str, **extra) -> dict:
    return {"key": "header", "value": {"summary": summary, "description": "", **extra}}


def regular(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


def lfs_file(path: str, data: bytes) -> dict:
    return {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": sha256(data), "size": len(data)}}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_create_repo(server: HubServer, repo_id: str = REPO, private: bool = False) -> str:
    ns, name = repo_id.split("/")
    body = {"name": name, "organization": ns}
    if private:
        body["visibility"] = "private"
    status, _, raw = request(server, "POST", "/api/repos/create", body)
    assert status == 200, raw
    return json.loads(raw)["url"]


def raw_lfs_put(server: HubServer, data: bytes) -> None:
    """LFS batch + basic PUT + verify, as huggingface_hub does it."""
    status, _, raw = request(
        server,
        "POST",
        f"/{REPO}.git/info/lfs/objects/batch",
        {"operation": "upload", "transfers": ["basic", "multipart"], "hash_algo": "sha256",
         "objects": [{"oid": sha256(data), "size": len(data)}], "ref": {"name": "main"}},
    )
    assert status == 200, raw
    (obj,) = json.loads(raw)["objects"]
    actions = obj["actions"]
    put = actions["upload"]["href"].split(str(server.port), 1)[1]
    assert request(server, "PUT", put, data, token=None)[0] == 200
    verify = actions["verify"]["href"].split(str(server.port), 1)[1]
    assert request(server, "POST", verify, {"oid": sha256(data), "size": len(data)})[0] == 200


def raw_commit(server: HubServer, *items, revision: str = "main"):
    return request(server, "POST", f"/api/models/{REPO}/commit/{revision}", ndjson(*items),
                {"Content-Type": "application/x-ndjson"})


def tree_of(server: HubServer, revision: str = "main") -> dict[str, bytes]:
    return {p: server.read_file(REPO, p, revision) for p in server.list_files(REPO, revision)}


GITATTRIBUTES_ONLY = [".gitattributes"]


# --------------------------------------------------------------------------------------------------------
# raw protocol tests (no subprocess)
# --------------------------------------------------------------------------------------------------------


def test_preupload_answers_lfs_for_weights_and_large_files(hub_server):
    raw_create_repo(hub_server)
    files = [
        {"path": "README.md", "size": 12, "sample": ""},
        {"path": "sub/model.safetensors", "size": 10, "sample": ""},
        {"path": "pytorch_model.bin", "size": 10, "sample": ""},
        {"path": "big.txt", "size": 10 * 1024 * 1024 + 1, "sample": ""},
        {"path": "limit.txt", "size": 10 * 1024 * 1024, "sample": ""},
        {"path": ".gitattributes", "size": 3, "sample": ""},
    ]
    status, _, raw = request(hub_server, "POST", f"/api/models/{REPO}/preupload/main", {"files": files})
    assert status == 200
    answer = json.loads(raw)
    assert answer["commitOid"] == hub_server.branch_head(REPO)
    gitattributes_oid = git_blob_sha1(hub_server.read_file(REPO, ".gitattributes"))
    assert answer["files"] == [
        {"path": "README.md", "uploadMode": "regular", "shouldIgnore": False, "oid": None},
        {"path": "sub/model.safetensors", "uploadMode": "lfs", "shouldIgnore": False, "oid": None},
        {"path": "pytorch_model.bin", "uploadMode": "lfs", "shouldIgnore": False, "oid": None},
        {"path": "big.txt", "uploadMode": "lfs", "shouldIgnore": False, "oid": None},
        {"path": "limit.txt", "uploadMode": "regular", "shouldIgnore": False, "oid": None},
        {"path": ".gitattributes", "uploadMode": "regular", "shouldIgnore": False, "oid": gitattributes_oid},
    ]
    # writes need a token; a wrong token gets the Hub's "invalid credentials" answer
    assert request(hub_server, "POST", f"/api/models/{REPO}/preupload/main", {"files": []}, token=None)[0] == 401
    status, headers, _ = request(hub_server, "GET", "/api/whoami-v2", token="hf_wrong")
    assert (status, headers["x-error-message"]) == (401, "Invalid credentials in Authorization header")


def test_commit_is_atomic_and_rejects_missing_lfs_objects(hub_server):
    raw_create_repo(hub_server)
    initial = hub_server.branch_head(REPO)
    weights = os.urandom(5000)

    # the LFS object was never uploaded: the whole commit is refused, nothing of it is visible
    status, headers, raw = raw_commit(
        hub_server, header("v1"), regular("notes.txt", b"hello"), lfs_file("model.safetensors", weights)
    )
    assert status == 400
    assert "LFS pointer pointed to a file that does not exist" in json.loads(raw)["error"]
    assert "model.safetensors" in json.loads(raw)["error"]
    assert hub_server.branch_head(REPO) == initial
    assert hub_server.list_files(REPO) == GITATTRIBUTES_ONLY
    assert [c["id"] for c in hub_server.history(REPO)] == [initial]

    # a PUT whose body does not hash to the announced oid is refused and stores nothing
    assert request(hub_server, "PUT", f"/__lfs/objects/{sha256(weights)}", weights[:-1] + b"x", token=None)[0] == 400
    assert hub_server.lfs_objects() == set()

    raw_lfs_put(hub_server, weights)
    assert hub_server.lfs_objects() == {sha256(weights)}
    # a second batch call for a stored object carries no upload action (client skips the PUT)
    _, _, raw = request(hub_server, "POST", f"/{REPO}.git/info/lfs/objects/batch",
                     {"operation": "upload", "objects": [{"oid": sha256(weights), "size": len(weights)}]})
    assert json.loads(raw)["objects"] == [{"oid": sha256(weights), "size": len(weights)}]

    status, _, raw = raw_commit(
        hub_server, header("v1"), regular("notes.txt", b"hello"), lfs_file("model.safetensors", weights)
    )
    assert status == 200, raw
    answer = json.loads(raw)
    v1 = answer["commitOid"]
    assert len(v1) == 40 and int(v1, 16) >= 0
    assert answer["commitUrl"] == f"{hub_server.url}/{REPO}/commit/{v1}"
    assert hub_server.branch_head(REPO) == v1
    assert tree_of(hub_server) == {
        ".gitattributes": hub_server.read_file(REPO, ".gitattributes"),
        "model.safetensors": weights,
        "notes.txt": b"hello",
    }
    assert [(c["title"], c["parents"]) for c in hub_server.history(REPO)] == [("v1", [initial]), ("initial commit", [])]

    # stale parentCommit -> 412; deleting a missing file -> 404 EntryNotFound; both leave v1 in place
    status, _, _ = raw_commit(hub_server, header("v2", parentCommit=initial), regular("x.txt", b"x"))
    assert status == 412
    status, headers, _ = raw_commit(hub_server, header("v2"), regular("x.txt", b"x"),
                                    {"key": "deletedFile", "value": {"path": "nope.txt"}})
    assert (status, headers["x-error-code"]) == (404, "EntryNotFound")
    assert hub_server.branch_head(REPO) == v1 and "x.txt" not in hub_server.list_files(REPO)
    # commits go to existing branches only
    status, headers, _ = raw_commit(hub_server, header("v2"), regular("x.txt", b"x"), revision="nobranch")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound")


def test_lfs_put_accepts_chunked_body(hub_server):
    data = os.urandom(70_000)
    parts = iter([data[:1], data[1:40_000], data[40_000:]])
    status, _, _ = request(hub_server, "PUT", f"/__lfs/objects/{sha256(data)}", parts, token=None, chunked=True)
    assert status == 200
    assert hub_server.storage.lfs_path(sha256(data)).read_bytes() == data
    # a chunked body that does not hash to the oid is refused
    bad = iter([data[:10], b"tampered"])
    assert request(hub_server, "PUT", f"/__lfs/objects/{sha256(data[:9])}", bad, token=None, chunked=True)[0] == 400


def test_resolve_headers_ranges_and_errors(hub_server):
    raw_create_repo(hub_server)
    text, weights = b"0123456789abcdef", os.urandom(4096)
    raw_lfs_put(hub_server, weights)
    status, _, raw = raw_commit(hub_server, header("add"), regular("dir/text.txt", text),
                                lfs_file("dir/w.bin", weights))
    assert status == 200
    sha = json.loads(raw)["commitOid"]

    status, h, body = request(hub_server, "HEAD", f"/{REPO}/resolve/main/dir/text.txt", token=None)
    assert (status, body) == (200, b"")
    assert h["x-repo-commit"] == sha
    assert h["etag"] == f'"{git_blob_sha1(text)}"'
    assert h["content-length"] == str(len(text))
    assert "x-linked-etag" not in h and "x-linked-size" not in h

    status, h, body = request(hub_server, "GET", f"/{REPO}/resolve/{sha}/dir%2Fw.bin", token=None)
    assert (status, body) == (200, weights)
    assert h["x-linked-etag"] == f'"{sha256(weights)}"'
    assert h["x-linked-size"] == str(len(weights))
    assert h["etag"] == f'"{git_blob_sha1(lfs_pointer(sha256(weights), len(weights)))}"'

    url = f"/{REPO}/resolve/main/dir/text.txt"
    for rng, expected, content_range in [
        ("bytes=2-5", text[2:6], "bytes 2-5/16"),
        ("bytes=10-", text[10:], "bytes 10-15/16"),
        ("bytes=-4", text[-4:], "bytes 12-15/16"),
        ("bytes=14-99", text[14:], "bytes 14-15/16"),
    ]:
        status, h, body = request(hub_server, "GET", url, headers={"Range": rng})
        assert (status, body, h["content-range"]) == (206, expected, content_range), rng
    status, h, _ = request(hub_server, "GET", url, headers={"Range": "bytes=16-"})
    assert (status, h["content-range"]) == (416, "bytes */16")

    for path, code in [
        (f"/{REPO}/resolve/main/missing.txt", "EntryNotFound"),
        (f"/{REPO}/resolve/nobranch/dir/text.txt", "RevisionNotFound"),
        ("/test-org/nope/resolve/main/dir/text.txt", "RepoNotFound"),
    ]:
        status, h, body = request(hub_server, "HEAD", path)
        assert (status, h["x-error-code"]) == (404, code), path
    status, h, body = request(hub_server, "GET", f"/{REPO}/resolve/main/missing.txt")
    assert h["x-repo-commit"] == sha and json.loads(body) == {"error": "Entry not found: missing.txt"}
    assert [r.endpoint for r in hub_server.requests if r.endpoint == "unknown"] == []


def test_storage_survives_restart_on_same_port(hub_server, tmp_path):
    raw_create_repo(hub_server)
    head, port = hub_server.branch_head(REPO), hub_server.port
    hub_server.stop()
    with pytest.raises(ConnectionRefusedError):
        request(hub_server, "GET", f"/api/models/{REPO}")
    hub_server.start()
    assert hub_server.port == port
    status, _, raw = request(hub_server, "GET", f"/api/models/{REPO}")
    assert status == 200 and json.loads(raw)["sha"] == head
    # a second server on the same root (e.g. another process) sees the same data
    with HubServer(root=tmp_path / "hub_storage") as other:
        assert json.loads(request(other, "GET", f"/api/models/{REPO}/refs")[2])["branches"] == [
            {"name": "main", "ref": "refs/heads/main", "targetCommit": head}
        ]


def test_seed_commits_through_the_http_api(hub_server):
    weights = b"\x07" * 1000
    sha = hub_server.seed(REPO, {"config.json": b"{}", "model.safetensors": weights}, branch="run-1", message="ckpt")
    assert hub_server.branch_head(REPO, "run-1") == sha
    assert hub_server.list_files(REPO, "run-1") == [".gitattributes", "config.json", "model.safetensors"]
    assert hub_server.list_files(REPO) == [".gitattributes"]  # main untouched
    assert hub_server.read_file(REPO, "model.safetensors", "run-1") == weights
    assert hub_server.lfs_objects() == {sha256(weights)}
    assert [c["title"] for c in hub_server.history(REPO, "run-1")] == ["ckpt", "initial commit"]
    assert [r.endpoint for r in hub_server.requests] == [
        "create_repo", "branch", "preupload", "lfs_upload", "commit"]


# --------------------------------------------------------------------------------------------------------
# real huggingface_hub client in a subprocess
# --------------------------------------------------------------------------------------------------------

UPLOAD_FILES = {
    "notes.txt": b"hello hub\n",
    "nested/cfg.json": b'{"a": 1}',
    "model.safetensors": bytes(range(256)) * 40,
    "nested/weights.bin": bytes(reversed(range(256))) * 12,
}
LFS_PATHS = {"model.safetensors", "nested/weights.bin"}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_client_create_upload_list_download(hub_server, hub_run, tmp_path):
    src = write_folder(tmp_path / "src", UPLOAD_FILES)
    out = hub_run(
        f"""
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
api, repo = HfApi(), {REPO!r}
out = {{"whoami": api.whoami()["name"]}}
url = api.create_repo(repo)
out["url"] = [str(url), url.repo_id, url.repo_type]
try:
    api.create_repo(repo)
except HfHubHTTPError as e:
    out["duplicate_status"] = e.response.status_code
out["exist_ok"] = str(api.create_repo(repo, exist_ok=True))
out["before"] = api.list_repo_files(repo)
info = api.upload_folder(repo_id=repo, folder_path={str(src)!r}, commit_message="first upload")
out["commit"] = info.oid
out["files"] = api.list_repo_files(repo)
out["top"] = [[type(e).__name__, e.path] for e in api.list_repo_tree(repo)]
out["tree"] = {{
    e.path: [type(e).__name__, getattr(e, "size", None), getattr(e, "blob_id", None),
             [e.lfs.sha256, e.lfs.size] if getattr(e, "lfs", None) else None]
    for e in api.list_repo_tree(repo, recursive=True)
}}
out["last_commit"] = {{e.path: e.last_commit.title for e in api.list_repo_tree(repo, expand=True)}}
mi = api.model_info(repo, files_metadata=True)
siblings = {{s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None] for s in mi.siblings}}
out["info"] = [mi.id, mi.sha, mi.private, siblings]
out["info_at_sha"] = api.repo_info(repo, revision=info.oid).sha
out["paths_info"] = [[type(e).__name__, e.path] for e in api.get_paths_info(repo, ["nested", "notes.txt", "missing"])]
out["downloads"] = {{p: hf_hub_download(repo, p) for p in {sorted(UPLOAD_FILES)!r}}}
snap = Path(snapshot_download(repo))
out["snapshot"] = {{str(p.relative_to(snap)): str(p) for p in snap.rglob("*") if p.is_file()}}
out["exists"] = [api.repo_exists(repo), api.repo_exists("test-org/nope"),
                 api.file_exists(repo, "nested/cfg.json"), api.file_exists(repo, "nested/nope.json")]
emit(out)
"""
    )
    assert out["whoami"] == DEFAULT_USER
    assert out["url"] == [f"{hub_server.url}/{REPO}", REPO, "model"]
    assert out["duplicate_status"] == 409
    assert out["exist_ok"] == f"{hub_server.url}/{REPO}"
    assert out["before"] == [".gitattributes"]
    assert out["commit"] == hub_server.branch_head(REPO)
    assert out["files"] == [".gitattributes", "model.safetensors", "nested/cfg.json", "nested/weights.bin", "notes.txt"]
    assert out["top"] == [["RepoFile", ".gitattributes"], ["RepoFile", "model.safetensors"],
                          ["RepoFolder", "nested"], ["RepoFile", "notes.txt"]]
    gitattributes = hub_server.read_file(REPO, ".gitattributes")
    expected_tree = {".gitattributes": ["RepoFile", len(gitattributes), git_blob_sha1(gitattributes), None]}
    for path, data in UPLOAD_FILES.items():
        if path in LFS_PATHS:
            pointer_oid = git_blob_sha1(lfs_pointer(sha256(data), len(data)))
            expected_tree[path] = ["RepoFile", len(data), pointer_oid, [sha256(data), len(data)]]
        else:
            expected_tree[path] = ["RepoFile", len(data), git_blob_sha1(data), None]
    expected_tree["nested"] = ["RepoFolder", None, None, None]
    assert out["tree"] == expected_tree
    assert out["last_commit"] == {".gitattributes": "initial commit", "model.safetensors": "first upload",
                                  "nested": "first upload", "notes.txt": "first upload"}
    assert out["info"] == [REPO, out["commit"], False, {
        p: [v[1], v[3][0] if v[3] else None] for p, v in expected_tree.items() if v[0] == "RepoFile"}]
    assert out["info_at_sha"] == out["commit"]
    assert out["paths_info"] == [["RepoFolder", "nested"], ["RepoFile", "notes.txt"]]
    for path, data in UPLOAD_FILES.items():
        assert Path(out["downloads"][path]).read_bytes() == data
        assert Path(out["snapshot"][path]).read_bytes() == data
        assert hub_server.read_file(REPO, path) == data
    assert sorted(out["snapshot"]) == out["files"]
    assert out["exists"] == [True, False, True, False]
    # the client followed the server's preupload answer: exactly the two weight files went through LFS
    assert len(hub_server.requests_to("lfs_upload")) == 2
    assert hub_server.lfs_objects() == {sha256(UPLOAD_FILES[p]) for p in LFS_PATHS}
    assert hub_server.requests_to("unknown") == []


def test_client_private_repo_and_revisions(hub_server, hub_run):
    out = hub_run(
        """
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
api = HfApi()
api.create_repo("test-user/secret", private=True)
out = {"private": api.model_info("test-user/secret").private}
try:
    api.model_info("test-user/secret", token=False)
except RepositoryNotFoundError:
    out["anonymous"] = "RepositoryNotFoundError"
out["anonymous_exists"] = api.repo_exists("test-user/secret", token=False)
try:
    api.model_info("test-user/secret", revision="v9")
except RevisionNotFoundError:
    out["bad_revision"] = "RevisionNotFoundError"
api.create_repo("own-repo")  # no namespace: created under the token's user
out["own"] = api.list_repo_files("test-user/own-repo")
emit(out)
"""
    )
    assert out == {"private": True, "anonymous": "RepositoryNotFoundError", "anonymous_exists": False,
                   "bad_revision": "RevisionNotFoundError", "own": [".gitattributes"]}


def test_client_branches_refs_commits_and_deletions(hub_server, hub_run):
    out = hub_run(
        f"""
from huggingface_hub import HfApi, CommitOperationAdd, CommitOperationDelete, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
api, repo = HfApi(), {REPO!r}
api.create_repo(repo)
main1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a/x.txt", repo_id=repo).oid
api.create_branch(repo, branch="ckpt/step-10")
api.create_branch(repo, branch="ckpt/step-10", exist_ok=True)
try:
    api.create_branch(repo, branch="ckpt/step-10")
except HfHubHTTPError as e:
    dup = e.response.status_code
dev = api.create_commit(repo, revision="ckpt/step-10", commit_message="on branch", operations=[
    CommitOperationAdd("w.safetensors", b"\\x00" * 100),
    CommitOperationAdd("a/y.txt", b"y"),
]).oid
dev2 = api.create_commit(repo, revision="ckpt/step-10", commit_message="delete folder a", operations=[
    CommitOperationDelete("a/"),
]).oid
api.create_tag(repo, tag="v1.0", revision=main1)
refs = api.list_repo_refs(repo)
emit({{
    "main1": main1, "dev": dev, "dev2": dev2, "dup": dup,
    "branches": [[b.name, b.ref, b.target_commit] for b in refs.branches],
    "tags": [[t.name, t.ref, t.target_commit] for t in refs.tags],
    "converts": refs.converts,
    "commits": [[c.commit_id, c.title, c.authors] for c in api.list_repo_commits(repo, revision="ckpt/step-10")],
    "main_files": api.list_repo_files(repo),
    "dev_files": api.list_repo_files(repo, revision="ckpt/step-10"),
    "at_dev": open(hf_hub_download(repo, "w.safetensors", revision=dev), "rb").read().hex(),
    "tag_files": api.list_repo_files(repo, revision="v1.0"),
}})
"""
    )
    initial = hub_server.history(REPO)[-1]["id"]
    assert out["dup"] == 409
    assert out["branches"] == [["ckpt/step-10", "refs/heads/ckpt/step-10", out["dev2"]],
                               ["main", "refs/heads/main", out["main1"]]]
    assert out["tags"] == [["v1.0", "refs/tags/v1.0", out["main1"]]]
    assert out["converts"] == []
    assert out["commits"] == [
        [out["dev2"], "delete folder a", [DEFAULT_USER]],
        [out["dev"], "on branch", [DEFAULT_USER]],
        [out["main1"], "Upload a/x.txt with huggingface_hub", [DEFAULT_USER]],
        [initial, "initial commit", [DEFAULT_USER]],
    ]
    assert out["main_files"] == [".gitattributes", "a/x.txt"]
    assert out["dev_files"] == [".gitattributes", "w.safetensors"]
    assert out["at_dev"] == "00" * 100
    assert out["tag_files"] == [".gitattributes", "a/x.txt"]
    assert [c["parents"] for c in hub_server.history(REPO, "ckpt/step-10")] == [
        [out["dev"]], [out["main1"]], [initial], []]


# ---- failure injection with the real client

UPLOAD_V = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo({repo!r}, exist_ok=True)
try:
    info = api.upload_folder(repo_id={repo!r}, folder_path={folder!r}, commit_message={msg!r})
    emit({{"ok": info.oid}})
except Exception as e:
    status = getattr(getattr(e, "response", None), "status_code", None)
    emit({{"error": type(e).__name__, "status": status, "message": str(e)}})
"""


def test_failed_commit_leaves_previous_commit_and_retry_succeeds(hub_server, hub_run, tmp_path):
    v1 = write_folder(tmp_path / "v1", {"config.json": b"{}", "model.safetensors": b"\x01" * 2048})
    v2 = write_folder(tmp_path / "v2", {"config.json": b'{"v": 2}', "model.safetensors": b"\x02" * 2048})
    first = hub_run(UPLOAD_V.format(repo=REPO, folder=str(v1), msg="v1"))
    head1 = first["ok"]
    assert hub_server.branch_head(REPO) == head1

    rule = hub_server.fail_next("commit", status=500)
    failed = hub_run(UPLOAD_V.format(repo=REPO, folder=str(v2), msg="v2"))
    assert (failed["error"], failed["status"], rule.hits) == ("HfHubHTTPError", 500, 1)
    # the v2 LFS object reached the server, but no commit references it: the repo is still at v1
    assert sha256(b"\x02" * 2048) in hub_server.lfs_objects()
    assert hub_server.branch_head(REPO) == head1
    assert tree_of(hub_server)["config.json"] == b"{}"
    assert tree_of(hub_server)["model.safetensors"] == b"\x01" * 2048

    retried = hub_run(UPLOAD_V.format(repo=REPO, folder=str(v2), msg="v2"))
    assert hub_server.branch_head(REPO) == retried["ok"] != head1
    assert [c["title"] for c in hub_server.history(REPO)] == ["v2", "v1", "initial commit"]
    assert hub_server.history(REPO)[0]["parents"] == [head1]
    assert tree_of(hub_server)["model.safetensors"] == b"\x02" * 2048
    # the retry found the object already stored: it was PUT once only
    assert len(hub_server.requests_to("lfs_upload")) == 2

    # a commit naming an LFS object that was never uploaded is refused by the server (400, JSON error)
    out = hub_run(
        f"""
from huggingface_hub import HfApi, CommitOperationAdd
from huggingface_hub.errors import BadRequestError
op = CommitOperationAdd("lost.safetensors", b"never uploaded" * 10)
op._upload_mode, op._should_ignore, op._is_uploaded = "lfs", False, True  # as if uploaded earlier
try:
    HfApi().create_commit({REPO!r}, [op], commit_message="lost")
except BadRequestError as e:
    emit([e.response.status_code, e.response.json()["error"]])
"""
    )
    assert out[0] == 400 and "LFS pointer pointed to a file that does not exist" in out[1]
    assert hub_server.branch_head(REPO) == retried["ok"]
    assert "lost.safetensors" not in hub_server.list_files(REPO)


def test_lfs_upload_refused_or_dropped(hub_server, hub_run, tmp_path):
    folder = write_folder(tmp_path / "up", {"model.safetensors": os.urandom(300_000), "README.md": b"# m\n"})
    raw_create_repo(hub_server)
    initial = hub_server.branch_head(REPO)

    # refused (403 is not retried by the client): upload fails fast, no commit is attempted
    rule = hub_server.fail_next("lfs_upload", status=403, count=None)
    failed = hub_run(UPLOAD_V.format(repo=REPO, folder=str(folder), msg="weights"))
    assert failed["error"] == "RuntimeError" and "model.safetensors" in failed["message"]
    assert rule.hits == 1 and hub_server.requests_to("commit") == []
    assert hub_server.branch_head(REPO) == initial and hub_server.lfs_objects() == set()
    hub_server.clear_failures()

    # connection dropped after 64 KiB of the PUT body: the client retries the PUT (1 s backoff) and succeeds
    rule = hub_server.drop_next("lfs_upload", after_bytes=64 * 1024)
    done = hub_run(UPLOAD_V.format(repo=REPO, folder=str(folder), msg="weights"))
    assert rule.hits == 1
    puts = hub_server.requests_to("lfs_upload")
    assert [r.status for r in puts] == [403, None, 200]
    assert hub_server.branch_head(REPO) == done["ok"]
    assert hub_server.read_file(REPO, "model.safetensors") == (folder / "model.safetensors").read_bytes()


def test_commit_response_lost_then_retry_is_a_noop(hub_server, hub_run, tmp_path):
    folder = write_folder(tmp_path / "up", {"config.json": b'{"x": 1}'})
    raw_create_repo(hub_server)
    rule = hub_server.drop_next("commit", during="response")
    lost = hub_run(UPLOAD_V.format(repo=REPO, folder=str(folder), msg="c1"))
    assert lost["error"] == "RemoteProtocolError" and rule.hits == 1
    # the commit was applied although the client saw an error
    head = hub_server.branch_head(REPO)
    assert hub_server.history(REPO)[0]["title"] == "c1"
    # retrying: preupload reports the same oid, the client skips the commit and returns the current head
    again = hub_run(UPLOAD_V.format(repo=REPO, folder=str(folder), msg="c1"))
    assert again["ok"] == head == hub_server.branch_head(REPO)
    assert len(hub_server.requests_to("commit")) == 1
    assert len(hub_server.history(REPO)) == 2


def test_download_cut_midway_resumes_with_range(hub_server, hub_run, tmp_path):
    # huggingface_hub reads downloads in 10 MiB chunks and resumes from the last complete chunk, so the
    # file is 10.5 MiB and the cut comes just after the first 10 MiB. Being > 10 MiB, it also goes via LFS
    # although "*.dat" matches no LFS pattern.
    data = bytes(range(256)) * (42 * 1024)
    folder = write_folder(tmp_path / "up", {"shard.dat": data})
    assert "ok" in hub_run(UPLOAD_V.format(repo=REPO, folder=str(folder), msg="w"))
    assert len(hub_server.requests_to("lfs_upload")) == 1
    rule = hub_server.drop_next("resolve", method="GET", during="response", after_bytes=10 * 1024 * 1024 + 4096)
    path = hub_run(f"from huggingface_hub import hf_hub_download; emit(hf_hub_download({REPO!r}, 'shard.dat'))")
    assert Path(path).read_bytes() == data
    gets = [r.status for r in hub_server.requests_to("resolve") if r.method == "GET"]
    assert rule.hits == 1 and gets == [200, 206]  # the second GET asked for the missing bytes only


def test_server_down_then_restart(hub_server, hub_run):
    raw_create_repo(hub_server)
    head = hub_server.branch_head(REPO)
    hub_server.stop()
    code = f"""
from huggingface_hub import HfApi
try:
    emit({{"sha": HfApi().model_info({REPO!r}).sha}})
except Exception as e:
    emit({{"error": type(e).__name__}})
"""
    assert hub_run(code) == {"error": "ConnectError"}
    hub_server.start()
    assert hub_run(code) == {"sha": head}


# ---- transformers / timm download through the same endpoints


def test_transformers_and_timm_round_trip(hub_server, hub_run, tmp_path):
    out = hub_run(
        f"""
import torch, timm
from timm.models._hub import save_for_hf
from transformers import ViTConfig, ViTModel
from huggingface_hub import HfApi
api, tmp = HfApi(), {str(tmp_path)!r}
torch.manual_seed(0)
cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=32, patch_size=8)
model = ViTModel(cfg).eval()
model.save_pretrained(tmp + "/vit")
api.create_repo("test-org/tiny-vit")
api.upload_folder(repo_id="test-org/tiny-vit", folder_path=tmp + "/vit")
loaded = ViTModel.from_pretrained("test-org/tiny-vit").eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    same_out = torch.equal(model(x).last_hidden_state, loaded(x).last_hidden_state)
a, b = model.state_dict(), loaded.state_dict()
vit = {{"files": api.list_repo_files("test-org/tiny-vit"), "same_keys": sorted(a) == sorted(b),
        "same_tensors": all(torch.equal(a[k], b[k]) for k in a), "same_output": same_out,
        "hidden_size": loaded.config.hidden_size, "n_params": sum(p.numel() for p in loaded.parameters())}}
tm = timm.create_model("resnet10t", num_classes=3)
save_for_hf(tm, tmp + "/timm", safe_serialization=True)
api.create_repo("test-org/tiny-timm")
api.upload_folder(repo_id="test-org/tiny-timm", folder_path=tmp + "/timm")
tm2 = timm.create_model("hf-hub:test-org/tiny-timm", pretrained=True)
sa, sb = tm.state_dict(), tm2.state_dict()
emit({{"vit": vit, "timm": {{"files": api.list_repo_files("test-org/tiny-timm"), "num_classes": tm2.num_classes,
       "same_tensors": sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)}}}})
""",
        timeout=240,
    )
    assert out["vit"] == {"files": [".gitattributes", "config.json", "model.safetensors"], "same_keys": True,
                          "same_tensors": True, "same_output": True, "hidden_size": 32,
                          "n_params": out["vit"]["n_params"]}
    assert out["vit"]["n_params"] > 10_000
    assert out["timm"] == {"files": [".gitattributes", "config.json", "model.safetensors"], "num_classes": 3,
                           "same_tensors": True}
    # both weight files went through LFS, and both libraries only used implemented endpoints
    assert len(hub_server.requests_to("lfs_upload")) == 2 and len(hub_server.lfs_objects()) == 2
    assert hub_server.requests_to("unknown") == []
