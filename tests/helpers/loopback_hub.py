"""A loopback Hugging Face Hub: a real HTTP server on 127.0.0.1 speaking the protocol ``huggingface_hub`` uses.

It serves in-memory repos with real commits. Per file request the client sends ``HEAD /{repo}/resolve/{rev}/{path}``
and reads ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` and the size; LFS files (weights) are answered with a
cross-origin redirect to ``/cdn/<sha256>`` on ``localhost``, as the real Hub redirects to its CDN. Errors carry the
``X-Error-Code`` the client maps to ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and
``EntryNotFoundError``. The API routes ``/api/models/{repo}[/revision/{rev}]`` and ``/tree/{rev}`` serve
``snapshot_download`` and ``transformers``. Every request is logged, so tests can assert that a cache hit made no
download and that a pinned commit made no request at all.

Uploads speak what ``HfApi.create_repo`` / ``upload_folder`` send when Xet is off (``HF_HUB_DISABLE_XET=1``):
``POST /api/repos/create`` (a new repo starts with a ``.gitattributes`` commit, as on the Hub), ``POST
/api/validate-yaml`` (the model card's metadata), ``POST /api/models/{repo}/preupload/{rev}`` (regular or LFS, and
the oid already there), the LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` whose upload actions point
to a pre-signed ``PUT`` on ``localhost`` (as the Hub's point to S3) and whose verify action the client calls after
it, and the NDJSON commit ``POST /api/models/{repo}/commit/{rev}`` (``header``, ``file`` in base64, ``lfsFile``
naming an uploaded object, ``deletedFile`` / ``deletedFolder``). Writes need a token of :attr:`LoopbackHub.tokens`
(``Authorization: Bearer ...``), as do reads of private repos. Route names in :attr:`LoopbackHub.failing`
(``"create"``, ``"preupload"``, ``"lfs-batch"``, ``"lfs-upload"``, ``"lfs-verify"``, ``"commit"``,
``"settings"``) answer 500. ``PUT /api/models/{repo}/settings`` (``HfApi.update_repo_settings``) sets a repo's
``gated`` mode and visibility; the model info reports both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")
WRITE_TOKEN = "hf_loopback_write_token"
# What the Hub's first commit of a new repo holds: these patterns are what makes a file LFS here.
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: str | bool = False  # "auto", "manual" or False, as the Hub's repo settings say

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
        self.tokens: set[str] = {WRITE_TOKEN}
        self.failing: set[str] = set()
        self._upload_urls: dict[str, tuple[str, int]] = {}  # pre-signed PUT: signature -> (oid, size)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        # Redirect LFS downloads cross-origin only where "localhost" is the same machine over IPv4.
        self.cdn_redirect = socket.gethostbyname("localhost") == "127.0.0.1"

    # -- content ------------------------------------------------------------------------------------------------
    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tag: str | None = None,
               replace: bool = False) -> str:
        """Add a commit holding ``files`` (on top of the branch's files unless ``replace``); returns its sha."""
        with self._lock:
            sha = self._commit(self.repos.setdefault(repo_id, Repo()), branch, files, replace=replace)
            if tag:
                self.repos[repo_id].refs[tag] = sha
            return sha

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], *, deleted: tuple[str, ...] = (),
                replace: bool = False) -> str:
        base = {} if replace or branch not in repo.refs else dict(repo.commits[repo.refs[branch]])
        for path in deleted:  # a file, or every file under a folder
            for p in [p for p in base if p == path or p.startswith(path.rstrip("/") + "/")]:
                del base[p]
        base.update(files)
        parent = repo.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for path in sorted(base):
            digest.update(path.encode() + b"\0" + hashlib.sha256(base[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = base
        repo.refs[branch] = sha
        for data in base.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return sha

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloads(self) -> list[Request]:
        """GET requests that transfer file content (resolve or CDN)."""
        return [r for r in self.requests if r.method == "GET" and ("/resolve/" in r.path or r.path.startswith("/cdn/"))]

    def writes(self) -> list[Request]:
        """Requests of the upload protocol (every POST and PUT)."""
        return [r for r in self.requests if r.method in ("POST", "PUT")]

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

            def do_POST(self) -> None:  # noqa: N802
                hub._handle_write(self, "POST")

            def do_PUT(self) -> None:  # noqa: N802
                hub._handle_write(self, "PUT")

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
        if repo is None or (repo.private and self._token(h) not in self.tokens):
            self._error(h, 404 if repo is None else 401, "RepoNotFound", f"Repository {repo_id} not found", head)
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
            blobs = parse_qs(urlsplit(h.path).query).get("blobs", [""])[0].lower() in ("1", "true")
            info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": self.repos[repo_id].private,
                    "gated": self.repos[repo_id].gated,
                    "siblings": [self._sibling(p, files[p], blobs) for p in sorted(files)]}
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

    @staticmethod
    def _sibling(path: str, data: bytes, blobs: bool) -> dict:
        item: dict = {"rfilename": path}
        if blobs:  # files_metadata=True: the git blob id, and the LFS sha256 of weights
            item.update(size=len(data), blobId=git_blob_sha1(data))
            if path.endswith(LFS_SUFFIXES):
                item["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return item

    # -- uploads ------------------------------------------------------------------------------------------------
    @staticmethod
    def _token(h: BaseHTTPRequestHandler) -> str | None:
        scheme, _, token = (h.headers.get("Authorization") or "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":  # a streamed file object
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    def _json(self, h, status: int, value, content_type: str = "application/json") -> None:
        self._send(h, status, {"Content-Type": content_type}, json.dumps(value).encode(), False)

    def _handle_write(self, h: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(h.path)
        path, query = split.path, parse_qs(split.query)
        with self._lock:
            self.requests.append(Request(method, path))
        body = self._body(h)
        parts = path.lstrip("/").split("/")
        if method == "PUT" and parts[0] == "lfs-upload":
            return self._lfs_put(h, unquote(parts[-1]), query.get("X-Amz-Signature", [""])[0], body)
        settings = method == "PUT" and len(parts) == 5 and parts[:2] == ["api", "models"] and parts[4] == "settings"
        if method != "POST" and not settings:
            return self._error(h, 405, "MethodNotAllowed", f"{method} {path}", False)
        if path == "/api/validate-yaml":
            return self._validate_yaml(h, json.loads(body))
        token = self._token(h)
        if token is None:
            return self._error(h, 401, "Unauthorized", "Invalid username or password.", False)
        if token not in self.tokens:
            return self._error(h, 401, "Unauthorized", "Invalid credentials in Authorization header", False)
        if path == "/api/repos/create":
            return self._create_repo(h, json.loads(body))
        if settings:
            return self._settings(h, f"{parts[2]}/{parts[3]}", json.loads(body or b"{}"))
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
            if parts[5] == "batch":
                return self._lfs_batch(h, repo_id, json.loads(body))
            if parts[5] == "verify":
                return self._lfs_verify(h, json.loads(body))
        if len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], unquote("/".join(parts[5:]))
            if action == "preupload":
                return self._preupload(h, repo_id, rev, json.loads(body))
            if action == "commit":
                return self._commit_route(h, repo_id, rev, body, query)
            if action == "branch":
                return self._create_branch(h, repo_id, rev, json.loads(body or b"{}"))
        return self._error(h, 404, "RepoNotFound", f"unknown route {method} {path}", False)

    def _settings(self, h, repo_id: str, payload: dict) -> None:
        """``PUT /api/models/{repo}/settings`` (``HfApi.update_repo_settings``): ``gated`` ("auto", "manual" or
        false) and ``visibility`` ("public" / "private")."""
        if self._failing(h, "settings"):
            return None
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(h, 404, "RepoNotFound", f"Repository Not Found for url: {repo_id}", False)
            gated = payload.get("gated", repo.gated)
            if gated not in ("auto", "manual", False):
                return self._json(h, 400, {"error": f"gated must be 'auto', 'manual' or false, got {gated!r}"})
            visibility = payload.get("visibility")
            if visibility not in (None, "public", "private"):
                return self._json(h, 400, {"error": f"unknown visibility {visibility!r}"})
            repo.gated = gated
            if visibility is not None:
                repo.private = visibility == "private"
        return self._json(h, 200, {})

    def _failing(self, h, route: str) -> bool:
        if route in self.failing:
            self._error(h, 500, "InternalError", f"{route} failed (LoopbackHub.failing)", False)
            return True
        return False

    def _validate_yaml(self, h, payload: dict) -> None:
        content = payload.get("content", "")
        meta = {}
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1]) or {}
            except yaml.YAMLError as e:
                return self._json(h, 400, {"errors": [{"message": f"Invalid YAML: {e}"}]})
        base = meta.get("base_model") or []
        unknown = [b for b in ([base] if isinstance(base, str) else base) if b not in self.repos]
        if unknown:  # the Hub only accepts existing model ids here
            return self._json(h, 400, {"errors": [{"message": f'"base_model" with value "{unknown[0]}" is not '
                                                              f'valid. Use a model id from https://hf.co/models.'}]})
        return self._json(h, 200, {"errors": [], "warnings": []})

    def _create_repo(self, h, payload: dict) -> None:
        if self._failing(h, "create"):
            return
        if payload.get("type") not in (None, "model"):
            return self._error(h, 400, "BadRequest", "only model repos here", False)
        repo_id = f"{payload.get('organization') or 'loopback-user'}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self._lock:
            if repo_id in self.repos:
                return self._json(h, 409, {"error": "You already created this model repo",
                                           "url": f"{self.url}/{repo_id}"})
            repo = self.repos[repo_id] = Repo(private=private)
            self._commit(repo, "main", {".gitattributes": GITATTRIBUTES})
        return self._json(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _create_branch(self, h, repo_id: str, branch: str, payload: dict) -> None:
        found = self._lookup(h, repo_id, payload.get("startingPoint") or "main", False)
        if found is None:
            return
        with self._lock:
            repo = self.repos[repo_id]
            if branch in repo.refs:
                return self._json(h, 409, {"error": f"Reference {branch} already exists"})
            repo.refs[branch] = found[0]
        return self._json(h, 200, {})

    def _preupload(self, h, repo_id: str, rev: str, payload: dict) -> None:
        if self._failing(h, "preupload"):
            return
        found = self._lookup(h, repo_id, rev, False)
        if found is None:
            return
        sha, files = found
        answer = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES)
            old = files.get(f["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old)
            answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        return self._json(h, 200, {"files": answer, "commitOid": sha})

    def _lfs_batch(self, h, repo_id: str, payload: dict) -> None:
        if self._failing(h, "lfs-batch"):
            return
        if self._lookup(h, repo_id, "main", False) is None:
            return
        if payload.get("operation") != "upload":
            return self._error(h, 400, "BadRequest", "only uploads here", False)
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.blobs or len(self.blobs[oid]) != size:  # known objects need no upload
                signature = secrets.token_hex(16)
                with self._lock:
                    self._upload_urls[signature] = (oid, size)
                host = "localhost" if self.cdn_redirect else "127.0.0.1"  # cross-origin, as S3 is
                item["actions"] = {
                    "upload": {"href": f"http://{host}:{self.port}/lfs-upload/{oid}?X-Amz-Signature={signature}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        return self._json(h, 200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")

    def _lfs_put(self, h, oid: str, signature: str, body: bytes) -> None:
        if self._failing(h, "lfs-upload"):
            return
        with self._lock:
            expected = self._upload_urls.pop(signature, None)
        if expected != (oid, len(body)):
            return self._error(h, 403, "SignatureDoesNotMatch", "bad or used upload URL, or wrong size", False)
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(h, 400, "BadDigest", "content does not match its sha256", False)
        with self._lock:
            self.blobs[oid] = body
        return self._send(h, 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b"", False)

    def _lfs_verify(self, h, payload: dict) -> None:
        if self._failing(h, "lfs-verify"):
            return
        data = self.blobs.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            return self._error(h, 404, "EntryNotFound", f"object {payload.get('oid')} was not uploaded", False)
        return self._json(h, 200, {"message": "Object verified"})

    def _commit_route(self, h, repo_id: str, rev: str, body: bytes, query: dict) -> None:
        if self._failing(h, "commit"):
            return
        if query.get("create_pr"):
            return self._error(h, 400, "BadRequest", "pull requests are not served here", False)
        if self._lookup(h, repo_id, rev, False) is None:
            return
        repo = self.repos[repo_id]
        if rev not in repo.refs:  # commits go onto a branch, never onto a commit
            return self._error(h, 400, "BadRequest", f"{rev} is not a branch", False)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return self._error(h, 400, "BadRequest", "the first NDJSON line is the header, with a summary", False)
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.blobs.get(value["oid"])
                if data is None:
                    return self._error(h, 422, "LfsObjectMissing", f"LFS object {value['oid']} of "
                                                                    f"{value['path']} was never uploaded", False)
                files[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(h, 400, "BadRequest", f"unknown operation {key!r}", False)
        with self._lock:
            parent = lines[0]["value"].get("parentCommit")
            if parent is not None and parent != repo.refs[rev]:
                return self._error(h, 412, "PreconditionFailed", "A commit has happened since. Please refresh and "
                                                                 "try again.", False)
            sha = self._commit(repo, rev, files, deleted=tuple(deleted))
        return self._json(h, 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                                   "pullRequestUrl": None})
