"""A loopback Hugging Face Hub: a real HTTP server on 127.0.0.1 speaking the protocol ``huggingface_hub`` uses.

It serves in-memory repos with real commits. Per file request the client sends ``HEAD /{repo}/resolve/{rev}/{path}``
and reads ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` and the size; LFS files (weights) are answered with a
cross-origin redirect to ``/cdn/<sha256>`` on ``localhost``, as the real Hub redirects to its CDN. Errors carry the
``X-Error-Code`` the client maps to ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and
``EntryNotFoundError``. The API routes ``/api/models/{repo}[/revision/{rev}]`` and ``/tree/{rev}`` serve
``snapshot_download`` and ``transformers``. Every request is logged, so tests can assert that a cache hit made no
download and that a pinned commit made no request at all.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


@dataclass(frozen=True)
class Request:
    method: str
    path: str


class LoopbackHub:
    """Start with :meth:`start`; add content with :meth:`commit`; inspect :attr:`requests`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        # Redirect LFS downloads cross-origin only where "localhost" is the same machine over IPv4.
        self.cdn_redirect = socket.gethostbyname("localhost") == "127.0.0.1"

    # -- content ------------------------------------------------------------------------------------------------
    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tag: str | None = None,
               replace: bool = False) -> str:
        """Add a commit holding ``files`` (on top of the branch's files unless ``replace``); returns its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            base = {} if replace or branch not in repo.refs else dict(repo.commits[repo.refs[branch]])
            base.update(files)
            parent = repo.refs.get(branch, "")
            digest = hashlib.sha1(parent.encode())
            for path in sorted(base):
                digest.update(path.encode() + b"\0" + hashlib.sha256(base[path]).digest())
            sha = digest.hexdigest()
            repo.commits[sha] = base
            repo.refs[branch] = sha
            if tag:
                repo.refs[tag] = sha
            for data in base.values():
                self.blobs[hashlib.sha256(data).hexdigest()] = data
            return sha

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloads(self) -> list[Request]:
        """GET requests that transfer file content (resolve or CDN)."""
        return [r for r in self.requests if r.method == "GET" and ("/resolve/" in r.path or r.path.startswith("/cdn/"))]

    # -- server -------------------------------------------------------------------------------------------------
    def start(self) -> LoopbackHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- protocol -----------------------------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, message: str, head: bool, extra: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, {"X-Error-Code": code, "X-Error-Message": message,
                               "Content-Type": "application/json", **(extra or {})}, body, head)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(h.path).path
        with self._lock:
            self.requests.append(Request("HEAD" if head else "GET", path))
        if path.startswith("/cdn/"):
            data = self.blobs.get(path[len("/cdn/"):])
            if data is None:
                return self._error(h, 404, "EntryNotFound", "no such blob", head)
            return self._send(h, 200, {"Content-Type": "application/octet-stream"}, data, head)
        if path.startswith("/api/models/"):
            return self._api(h, path[len("/api/models/"):], head)
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{parts[0]}/{parts[1]}"
            return self._resolve(h, repo_id, unquote(parts[3]), unquote("/".join(parts[4:])), head)
        return self._error(h, 404, "RepoNotFound", f"unknown route {path}", head)

    def _lookup(self, h, repo_id: str, rev: str, head: bool) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        sha = repo.resolve(rev)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return None
        return sha, repo.commits[sha]

    def _resolve(self, h, repo_id: str, rev: str, filename: str, head: bool) -> None:
        found = self._lookup(h, repo_id, rev, head)
        if found is None:
            return
        sha, files = found
        if filename not in files:
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist at {rev}", head,
                               {"X-Repo-Commit": sha})
        data = files[filename]
        if filename.endswith(LFS_SUFFIXES):
            oid = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": sha, "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data)),
                       "ETag": f'"{git_blob_sha1(data)}"'}
            if self.cdn_redirect:
                headers["Location"] = f"http://localhost:{self.port}/cdn/{oid}"
                return self._send(h, 302, headers, b"", head)
            return self._send(h, 200, {**headers, "Content-Type": "application/octet-stream"}, data, head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"}
        return self._send(h, 200, headers, data, head)

    def _api(self, h, rest: str, head: bool) -> None:
        parts = rest.split("/")
        if len(parts) < 2:
            return self._error(h, 404, "RepoNotFound", "bad api route", head)
        repo_id = f"{parts[0]}/{parts[1]}"
        tail = parts[2:]
        if not tail or tail[0] == "revision":
            rev = unquote("/".join(tail[1:])) if tail else "main"
            found = self._lookup(h, repo_id, rev, head)
            if found is None:
                return
            sha, files = found
            info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)]}
            return self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)
        if tail[0] == "tree" and len(tail) >= 2:
            found = self._lookup(h, repo_id, unquote(tail[1]), head)
            if found is None:
                return
            _, files = found
            prefix = "/".join(tail[2:])
            entries = []
            for p in sorted(files):
                if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                    continue
                item = {"type": "file", "path": p, "size": len(files[p]), "oid": git_blob_sha1(files[p])}
                if p.endswith(LFS_SUFFIXES):
                    item["lfs"] = {"oid": hashlib.sha256(files[p]).hexdigest(), "size": len(files[p]),
                                   "pointerSize": 134}
                entries.append(item)
            return self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), head)
        return self._error(h, 404, "RepoNotFound", f"unknown api route {rest}", head)
