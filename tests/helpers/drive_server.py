"""A loopback Google Drive: a real HTTP server on 127.0.0.1 that answers ``gdown`` as Drive does.

Drive hands out a public file in up to three steps, and gdown follows them:

1. ``/uc?id=ID`` (what gdown makes of a ``/file/d/ID/view`` link) redirects (303) to
   ``/download?id=ID&export=download`` on ``drive.usercontent.google.com``;
2. for a large file that answers with an HTML page ("Google Drive can't scan this file for viruses") whose
   ``<form id="download-form">`` carries hidden ``id``, ``export``, ``confirm`` and ``uuid`` inputs; gdown submits
   the form's action with them (a page with ``<p class="uc-error-subcaption">``, Drive's quota page, makes gdown
   give up);
3. the file itself, with ``Content-Disposition: attachment; filename="..."``, ``Content-Length``, an ``ETag`` and
   byte ranges (gdown resumes a broken transfer with ``Range`` / ``If-Range``).

gdown takes these steps only for drive.google.com links, which it always fetches over https. So the server is also
an HTTPS proxy for exactly those hosts: it answers ``CONNECT drive.google.com:443`` itself, speaking TLS with a
certificate made for the Drive hosts by ``openssl`` (see :meth:`LoopbackDrive.enable_tls`), and never opens a
connection anywhere; ``CONNECT`` to any other host is refused. With ``https_proxy`` pointed at :attr:`url` and
``REQUESTS_CA_BUNDLE`` at :attr:`ca_bundle`, gdown runs its real Drive code path against this server. Plain
``http://127.0.0.1:PORT/...`` URLs reach the same routes without TLS (gdown then downloads them as they are).

Faults for tests: :attr:`cut` (the next N file responses announce the full ``Content-Length``, send half of it and
close the connection), :attr:`quota` (Drive's quota page instead of the confirmation page). ``/file/d/ID/view`` is
Drive's HTML viewer page, which is what a viewer link gives a client that does not know Drive. Every request is
logged in :attr:`requests` as ``(host, method, path)``.
"""

from __future__ import annotations

import hashlib
import html
import shutil
import ssl
import subprocess
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

DRIVE_HOSTS = ("drive.google.com", "drive.usercontent.google.com", "docs.google.com")
USERCONTENT = "drive.usercontent.google.com"


@dataclass
class DriveFile:
    name: str
    data: bytes
    large: bool = False  # Drive's virus-scan confirmation page first (files over about 100 MB)


class LoopbackDrive:
    """Start with :meth:`start`; publish files with :meth:`put`; :meth:`enable_tls` for the Drive-host route."""

    def __init__(self) -> None:
        self.files: dict[str, DriveFile] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.cut = 0
        self.quota = False
        self.ca_bundle: Path | None = None
        self._tls: ssl.SSLContext | None = None
        self._uuids: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def put(self, file_id: str, name: str, data: bytes, *, large: bool = False) -> None:
        self.files[file_id] = DriveFile(name, data, large)

    # -- server -------------------------------------------------------------------------------------------------
    def start(self) -> LoopbackDrive:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.drive = self  # type: ignore[attr-defined]
        self._server = server
        threading.Thread(target=server.serve_forever, name="loopback-drive", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def enable_tls(self, folder: Path) -> Path:
        """Make a self-signed certificate for the Drive hosts in ``folder`` and serve them over TLS behind
        ``CONNECT``; returns the certificate, the CA bundle a client must trust (and nothing else)."""
        if shutil.which("openssl") is None:
            raise RuntimeError("the Drive-host route needs the openssl command to make its certificate")
        key, cert = folder / "drive-key.pem", folder / "drive-cert.pem"
        san = ",".join(f"DNS:{h}" for h in DRIVE_HOSTS)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj",
                        "/CN=loopback drive", "-addext", f"subjectAltName={san}"],
                       check=True, capture_output=True, timeout=60)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self._tls, self.ca_bundle = ctx, cert
        return cert

    def log(self, host: str, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((host, method, path))

    def take_cut(self) -> bool:
        with self._lock:
            if self.cut > 0:
                self.cut -= 1
                return True
            return False

    def confirm_uuid(self, file_id: str) -> str:
        with self._lock:
            return self._uuids.setdefault(file_id, str(uuid.uuid4()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackDrive"
    timeout = 30  # a stuck client never holds a thread for long
    tls_host: str | None = None

    @property
    def drive(self) -> LoopbackDrive:
        return self.server.drive  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    # -- the proxy side: CONNECT to a Drive host ends here, in TLS with our certificate ---------------------------
    def do_CONNECT(self) -> None:  # noqa: N802
        host, _, port = self.path.partition(":")
        self.drive.log(host, "CONNECT", self.path)
        if self.drive._tls is None or host not in DRIVE_HOSTS or port != "443":
            self._send(403, b"this proxy serves only the loopback Google Drive\n", "text/plain")
            self.close_connection = True
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        try:
            self.request = self.drive._tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            self.close_connection = True
            return
        self.setup()  # rfile / wfile over the TLS socket; the keep-alive loop reads the tunnelled requests
        self.tls_host = host
        self.close_connection = False

    # -- Drive -------------------------------------------------------------------------------------------------
    def _base(self, host: str) -> str:
        """Where this client reaches ``host``: https on the Drive hosts, this server's own address otherwise."""
        return f"https://{host}" if self.tls_host else f"http://{self.headers.get('Host')}"

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        host = self.tls_host or self.headers.get("Host", "")
        self.drive.log(host, "GET", self.path)
        file_id = query.get("id", "")
        if parts.path.startswith("/file/d/"):
            file_id = parts.path.split("/")[3]
            if file_id in self.drive.files:
                return self._viewer(self.drive.files[file_id])
        if file_id not in self.drive.files:
            return self._send(404, b"<html><body>Sorry, the file you have requested does not exist.</body></html>",
                              "text/html; charset=utf-8")
        if parts.path == "/uc":
            location = f"{self._base(USERCONTENT)}/download?id={file_id}&export=download"
            return self._send(303, b"", "text/html; charset=UTF-8", {"Location": location})
        if parts.path != "/download":
            return self._send(404, b"<html><body>Not Found</body></html>", "text/html; charset=utf-8")
        f = self.drive.files[file_id]
        if f.large and query.get("confirm") != "t":
            return self._confirmation(file_id, f)
        if f.large and query.get("uuid") != self.drive.confirm_uuid(file_id):
            return self._send(400, b"<html><body>Bad Request</body></html>", "text/html; charset=utf-8")
        self._file(f)

    def _viewer(self, f: DriveFile) -> None:
        page = (f"<!DOCTYPE html><html><head><title>{html.escape(f.name)} - Google Drive</title></head>"
                f"<body><div id=\"drive-viewer\">{html.escape(f.name)}</div></body></html>")
        self._send(200, page.encode(), "text/html; charset=utf-8")

    def _confirmation(self, file_id: str, f: DriveFile) -> None:
        if self.drive.quota:
            page = ("<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>\n"
                    '<p class="uc-error-caption">Sorry, you can\'t view or download this file at this time.</p>\n'
                    '<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. '
                    "Please try accessing the file again later.</p>\n</body></html>")
            return self._send(200, page.encode(), "text/html; charset=utf-8")
        size_mb = f"{len(f.data) / 1e6:.0f}M"
        # one line, as Drive writes it: gdown looks for the form line by line
        form = (f'<form id="download-form" action="{self._base(USERCONTENT)}/download" method="get">'
                '<input type="submit" id="uc-download-link" value="Download anyway"/>'
                f'<input type="hidden" name="id" value="{file_id}">'
                '<input type="hidden" name="export" value="download">'
                '<input type="hidden" name="confirm" value="t">'
                f'<input type="hidden" name="uuid" value="{self.drive.confirm_uuid(file_id)}"></form>')
        page = ("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>\n"
                '<div class="uc-main"><div id="uc-text"><p class="uc-warning-caption">Google Drive can\'t scan '
                "this file for viruses.</p>\n"
                f'<p class="uc-warning-subcaption"><span class="uc-name-size"><a href="/open?id={file_id}">'
                f"{html.escape(f.name)}</a> ({size_mb})</span> is too large for Google to scan for viruses. "
                "Would you still like to download this file?</p>\n"
                f"{form}\n</div></div></body></html>")
        self._send(200, page.encode(), "text/html; charset=utf-8")

    def _file(self, f: DriveFile) -> None:
        data, start = f.data, 0
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and self.headers.get("If-Range", etag) == etag:
            start = int(ranged[len("bytes="):].split("-")[0] or 0)
        body = data[start:]
        headers = {"Content-Disposition": f'attachment; filename="{f.name}"', "ETag": etag,
                   "Accept-Ranges": "bytes"}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if self.drive.take_cut():  # announce everything, send half, hang up
            self._send(status, body[: len(body) // 2], "application/octet-stream", headers, length=len(body))
            self.close_connection = True
            return
        self._send(status, body, "application/octet-stream", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
