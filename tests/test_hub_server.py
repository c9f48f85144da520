"""Tests of tests/hub_server.py: raw HTTP from this process (``http.client``) pins the wire format and the
guarantees the publishing and kill tests rely on (upload modes, atomic commits, download headers, failure
injection, restart). The real ``huggingface_hub`` client runs against the server in those tests.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import time

import pytest

from hub_server import DEFAULT_TOKEN, HubServer, git_blob_sha1, lfs_pointer

REPO = "test-org/demo"


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def request(server: HubServer, method: str, path: str, body=None, headers=None, token=DEFAULT_TOKEN):
    """One HTTP request to the server; returns (status, headers (lower-case keys), body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=hdrs)
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


def raw_create_repo(server: HubServer, repo_id: str = REPO) -> str:
    ns, name = repo_id.split("/")
    body = {"name": name, "organization": ns}
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


def tree_of(server: HubServer) -> dict[str, bytes]:
    return {p: server.read_file(REPO, p) for p in server.list_files(REPO)}


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

    # commits go to existing branches only
    status, headers, _ = raw_commit(hub_server, header("v2"), regular("x.txt", b"x"), revision="nobranch")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound")


def test_resolve_headers_and_errors(hub_server):
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


def test_storage_survives_restart_on_same_port(hub_server):
    raw_create_repo(hub_server)
    head, port = hub_server.branch_head(REPO), hub_server.port
    hub_server.stop()
    with pytest.raises(ConnectionRefusedError):
        request(hub_server, "GET", f"/api/models/{REPO}")
    hub_server.start()
    assert hub_server.port == port
    status, _, raw = request(hub_server, "GET", f"/api/models/{REPO}")
    assert status == 200 and json.loads(raw)["sha"] == head


def test_injected_failures_and_cut_uploads_store_nothing(hub_server):
    """What the kill and retry tests rely on: a failed or cut request changes nothing and is logged as such."""
    raw_create_repo(hub_server)
    initial, weights = hub_server.branch_head(REPO), os.urandom(5000)
    rule = hub_server.fail_next("lfs_upload", status=503, count=None)
    for _ in range(2):
        assert request(hub_server, "PUT", f"/__lfs/objects/{sha256(weights)}", weights, token=None)[0] == 503
    hub_server.clear_failures()
    rule_commit = hub_server.fail_next("commit", status=500)  # count=1: the next commit only
    assert raw_commit(hub_server, header("v1"), regular("a.txt", b"a"))[0] == 500
    assert raw_commit(hub_server, header("v1"), regular("a.txt", b"a"))[0] == 200
    assert (rule.hits, rule_commit.hits) == (2, 1)
    # a client that dies halfway through a PUT body: no answer (status None), no object stored
    with socket.create_connection(("127.0.0.1", hub_server.port)) as sock:
        sock.sendall(f"PUT /__lfs/objects/{sha256(weights)} HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(weights)}\r\n\r\n".encode() + weights[:1000])
    for _ in range(200):  # the handler thread notices the closed connection
        if len(hub_server.requests_to("lfs_upload")) == 3:
            break
        time.sleep(0.05)
    assert [r.status for r in hub_server.requests_to("lfs_upload")] == [503, 503, None]
    assert [r.status for r in hub_server.requests_to("commit")] == [500, 200]
    assert hub_server.lfs_objects() == set()
    assert [c["title"] for c in hub_server.history(REPO)] == ["v1", "initial commit"]
    assert hub_server.history(REPO)[0]["parents"] == [initial] and tree_of(hub_server)["a.txt"] == b"a"
    with pytest.raises(ValueError, match="branch"):
        hub_server.fail_next("branch")  # only implemented endpoints can fail
