"""A small in-memory stand-in for the Hugging Face Hub, on 127.0.0.1, for tests without internet.

It speaks the part of the Hub HTTP API that ``huggingface_hub`` (2.x, Xet disabled) uses to create a repo, push
with ``upload_folder`` (validate-yaml, preupload, Git LFS batch + basic PUT upload + verify, NDJSON commit, file
listing for ``delete_patterns``) and download with ``model_info`` / ``hf_hub_download`` / ``snapshot_download``
(revision info, tree, HEAD/GET resolve). Writes need ``Authorization: Bearer <token>``; private repos need it for
reads too. Every request is recorded in ``server.requests`` as ``(method, path)``.

    with HubServer(token="hf_test") as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.gguf")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # commit shas, oldest first
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[str]:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def commit(self, files: dict[str, StoredFile], branch: str = "main") -> str:
        sha = hashlib.sha1(f"{self.repo_id}:{len(self.history)}:{time.time_ns()}".encode()).hexdigest()
        self.commits[sha] = files
        self.history.append(sha)
        self.branches[branch] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        """The whole request body (Content-Length or chunked), read before routing so the connection stays usable."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _body(self) -> bytes:
        return self._raw_body

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[dict] = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, message: str, code: Optional[str] = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server.hub.token}"

    def _repo(self, repo_id: str, write: bool = False, head: bool = False) -> Optional[Repo]:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if self._authorized() else 401, "Repository not found", "RepoNotFound", head)
            return None
        if write and not self._authorized():
            self._error(403, "You don't have the rights to write to this repo", None, head)
            return None
        return repo

    def _revision(self, repo: Repo, revision: str, head: bool = False) -> Optional[str]:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head)
        return sha

    # ------------------------------------------------------------------ dispatch
    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self._raw_body = self._read_body()
        self.server.hub.requests.append((method, path))
        parts = path.strip("/").split("/")
        try:
            with self.server.hub.lock:
                self._route(method, path, parts, query)
        except Exception as err:  # a bug here should show up as a clear 500 in the client's error
            self._error(500, f"test hub server error: {type(err).__name__}: {err}")

    def _route(self, method: str, path: str, parts: list[str], query: dict) -> None:
        head = method == "HEAD"
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if method == "PUT" and parts[:1] == ["__lfs"]:
            return self._lfs_put(parts[1])
        if method == "POST" and parts[:1] == ["__lfs_verify"]:
            return self._lfs_verify()
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4], parts[5:]
            if method == "POST" and action == "preupload":
                return self._preupload(repo_id, "/".join(rest))
            if method == "POST" and action == "commit":
                return self._commit(repo_id, "/".join(rest))
            if method == "GET" and action == "revision":
                return self._model_info(repo_id, "/".join(rest))
            if method == "GET" and action == "tree":
                return self._tree(repo_id, rest[0] if rest else "main", "/".join(rest[1:]), query)
        if len(parts) == 4 and parts[:2] == ["api", "models"] and method == "GET":
            return self._model_info(repo_id=f"{parts[2]}/{parts[3]}", revision="main")
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        self._error(404, f"test hub server: no route for {method} {path}")

    # ------------------------------------------------------------------ repos
    def _create_repo(self) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(self._body())
        if payload.get("type") not in (None, "model"):
            return self._error(400, "test hub server: model repos only")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.server.hub.url}/{repo_id}"
        if repo_id in self.server.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id, private)
        repo.commit({".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)})
        self.server.hub.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
            if not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._revision(repo, revision)
        if sha is None:
            return
        files = repo.commits[sha]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": name} for name in sorted(files)]})

    def _tree(self, repo_id: str, revision: str, subpath: str, query: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._revision(repo, revision)
        if sha is None:
            return
        entries = []
        for name, f in sorted(repo.commits[sha].items()):
            if subpath and not name.startswith(subpath.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": name, "size": len(f.pointer if f.lfs else f.data), "oid": f.blob_id}
            if f.lfs:
                entry["size"] = len(f.data)
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
            entries.append(entry)
        self._json(200, entries)

    # ------------------------------------------------------------------ upload
    def _preupload(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        sha = self._revision(repo, revision)
        if sha is None:
            return
        current = repo.commits[sha]
        out = []
        for f in json.loads(self._body())["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = any(fnmatch.fnmatch(f["path"], p) for p in LFS_PATTERNS) or b"\0" in sample or f["size"] > 10 ** 7
            old = current.get(f["path"])
            oid = None if old is None else (old.sha256 if old.lfs else old.blob_id)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._json(200, {"files": out, "commitOid": sha})

    def _lfs_batch(self, repo_id: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        payload = json.loads(self._body())
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.hub.lfs:
                item["actions"] = {
                    "upload": {"href": f"{self.server.hub.url}/__lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.server.hub.url}/__lfs_verify"},
                }
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "sha256 of the uploaded content does not match the LFS oid")
        self.server.hub.lfs[oid] = data
        self._send(200)

    def _lfs_verify(self) -> None:
        payload = json.loads(self._body())
        data = self.server.hub.lfs.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            return self._error(404, "LFS object not found or of another size")
        self._json(200, {"success": True})

    def _commit(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if parse_qs(urlsplit(self.path).query).get("create_pr"):
            return self._error(400, "test hub server: create_pr is not supported")
        branch = unquote(revision)
        if branch not in repo.branches:
            return self._error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if "ndjson" not in (self.headers.get("Content-Type") or ""):
            return self._error(400, "commit payload must be application/x-ndjson")
        files = dict(repo.commits[repo.branches[branch]])
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header" or not lines[0]["value"].get("summary"):
            return self._error(400, "the first NDJSON line must be the commit header with a summary")
        parent = lines[0]["value"].get("parentCommit")
        if parent is not None and parent != repo.branches[branch]:
            return self._error(412, "parentCommit is not the head of the branch")
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "regular files must be base64-encoded")
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.server.hub.lfs.get(value["oid"])
                if data is None:
                    return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(data, lfs=True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for name in [n for n in files if n.startswith(prefix)]:
                    del files[name]
            else:
                return self._error(400, f"test hub server: unsupported commit operation {key!r}")
        sha = repo.commit(files, branch)
        self.server.hub.commit_messages.append(lines[0]["value"]["summary"])
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.server.hub.url}/{repo_id}/commit/{sha}",
                         "pullRequestUrl": None})

    # ------------------------------------------------------------------ download
    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        sha = self._revision(repo, revision, head)
        if sha is None:
            return
        f = repo.commits[sha].get(filename)
        if f is None:
            return self._error(404, "Entry not found", "EntryNotFound", head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.blob_id}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))})
        data = f.data
        start = 0
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes=") and not head:
            first, _, last = byte_range[6:].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return self._send(206, data[start:end], headers)
        self._send(200, data, headers, head)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "HubServer"


class HubServer:
    """Run the fake Hub in a background thread; use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.commit_messages: list[str] = []
        self.lock = threading.Lock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self.url = ""

    def start(self) -> "HubServer":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        """The files of ``repo_id`` at ``revision`` (for assertions)."""
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]


if __name__ == "__main__":  # python tests/hub_server.py: serve until Ctrl-C (for trying the client by hand)
    server = HubServer().start()
    print(f"fake Hub at {server.url} (token {server.token}); export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
