"""A real local stand-in for OpenAI's blob storage and the Hugging Face Hub, with fault injection.

    with Hub() as hub:
        hub.add_openai("124M", folder_or_dict)            # served at {hub.openai_url}/124M/{file}
        hub.add_hf("openai-community/gpt2", files)          # served at {hub.endpoint}/{repo}/resolve/{rev}/{file}
        hub.faults["openai-community/gpt2/model.safetensors"] = Fault(cut_after=1 << 20)
        ...
        hub.sent[key]                                       # body bytes actually written for that file

Files are keyed by their path on the server without the leading slash: `gpt-2/models/124M/hparams.json` for
OpenAI, `{repo_id}/{filename}` for the hub (every revision serves the same files). The hub answers
`HEAD`/`GET /{repo_id}/resolve/{revision}/{filename}` with the headers huggingface_hub's
`get_hf_file_metadata` reads (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`, `Content-Length`);
LFS files get a 302 to `/lfs-cdn/{sha256}` on a second server (another port, so really cross-origin), like
the hub's redirect to its CDN. Both serve `Range` (206 + `Content-Range`, 416 past the end) and `If-Range`.

Hostile modes for the whole server: `Hub(mode="html")` answers every request 200 with an HTML page (a captive
portal, or an HF_ENDPOINT that is a web site); `Hub(mode="redirect_loop")` answers every request with a
redirect to itself. Per file, `Fault(content_length=N)` declares N bytes but sends the whole body, and
`Fault(cut_after=N, cuts=BIG, ignore_range=True)` is a server that ignores Range and cuts at the same byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack")


@dataclass
class Fault:
    """Misbehaviour for one file; each kind fires on every request unless a count says otherwise."""

    status: int | None = None  # always answer this status (404, 403, 401, ...)
    fail_first: int = 0  # answer `fail_status` to the next N requests (HEAD or GET)
    fail_status: int = 503
    retry_after: str | None = None  # Retry-After header sent with those failures
    cut_after: int | None = None  # close the connection after N body bytes ...
    cuts: int = 1  # ... on this many responses
    stall: float = 0.0  # before cutting, go silent this many seconds (a stalled read)
    trickle: float = 0.0  # seconds to sleep between chunks
    chunk: int = 64 * 1024
    gate: threading.Event | None = None  # hold the body after `gate_at` bytes until this is set
    gate_at: int = 0
    flip_byte: int | None = None  # serve the content with the byte at this offset flipped
    ignore_range: bool = False  # answer Range requests with 200 and the whole file
    content_length: int | None = None  # declare this Content-Length (-1: none), whatever the body's length
    then: Fault | None = None  # replaces this fault once its fail_first and cuts are used up


@dataclass
class Request:
    method: str
    path: str
    key: str | None
    headers: Message  # case-insensitive .get()
    status: int = 0


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fake_safetensors(payload: bytes) -> bytes:
    """A well-formed safetensors file holding `payload` as one uint8 tensor."""
    header = json.dumps({"blob": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}})
    raw = header.encode().ljust(-(-len(header) // 8) * 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def tiny_as_124m_env() -> dict[str, str]:
    """Environment for a subprocess that should accept the tiny OpenAI fixture served as "124M"."""
    here = Path(__file__).resolve().parent
    return {"PYTHONPATH": os.pathsep.join([str(here / "tiny124m"), str(here.parent)])}


HTML = b"<!doctype html><html><head><title>Sign in</title></head><body>Welcome to the network</body></html>\n"


@dataclass
class Hub:
    """Two ThreadingHTTPServers on 127.0.0.1 (hub + CDN) serving `files`, started by `with Hub() as hub`."""

    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    revisions: dict[str, str] = field(default_factory=lambda: {"main": "c0ffee" * 6 + "c0de"})
    sent: Counter = field(default_factory=Counter)
    requests: list[Request] = field(default_factory=list)
    mode: str | None = None  # None, "html" or "redirect_loop": hostile behaviour for every request
    tls: tuple[Path, Path] | None = None  # (certificate, key): serve HTTPS with them

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # --- content -----------------------------------------------------------------------------------------
    def add_openai(self, size: str, files: dict[str, bytes] | Path) -> None:
        self.add(f"gpt-2/models/{size}", files)

    def add_hf(self, repo_id: str, files: dict[str, bytes] | Path) -> None:
        self.add(repo_id, files)

    def add(self, prefix: str, files: dict[str, bytes] | Path) -> None:
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        with self.lock:
            for name, data in files.items():
                self.files[f"{prefix}/{name}"] = bytes(data)

    def requests_for(self, key: str, method: str = "GET") -> list[Request]:
        return [r for r in self.requests if r.key == key and r.method == method]

    # --- addresses ---------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The hub's base URL, for HF_ENDPOINT."""
        return f"{self._scheme}://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def openai_url(self) -> str:
        """The OpenAI base URL, for GPT2LOAD_OPENAI_URL."""
        return f"{self.endpoint}/gpt-2/models"

    @property
    def _scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def cdn(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._servers[1].server_address[1]}"

    # --- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> Hub:
        for _ in range(2):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True  # a stalled handler must not block shutdown
            server.hub = self  # type: ignore[attr-defined]
            if self.tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(*self.tls)
                server.socket = ctx.wrap_socket(server.socket, server_side=True)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    # --- fault bookkeeping (called by handlers) ----------------------------------------------------------
    def _take_failure(self, key: str) -> tuple[Fault | None, bool]:
        """The fault for this request and whether its `fail_first` fires (consuming one)."""
        with self.lock:
            f = self.faults.get(key)
            if f is None or f.status is not None or f.fail_first <= 0:
                return f, False
            f.fail_first -= 1
            self._advance(key)
            return f, True

    def _take_cut(self, key: str, fault: Fault) -> bool:
        with self.lock:
            if fault.cut_after is None or fault.cuts <= 0:
                return False
            fault.cuts -= 1
            self._advance(key)
            return True

    def _advance(self, key: str) -> None:
        f = self.faults[key]
        if f.then is not None and f.fail_first <= 0 and (f.cut_after is None or f.cuts <= 0):
            self.faults[key] = f.then


class _Handler(BaseHTTPRequestHandler):
    server_version = "hubserver/1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet tests
        pass

    @property
    def hub(self) -> Hub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path).lstrip("/")
        self.log = Request(self.command, path, None, self.headers)
        with self.hub.lock:
            self.hub.requests.append(self.log)
        if self.hub.mode == "html":
            body = b"" if self.command == "HEAD" else HTML
            self._respond(200, {"Content-Type": "text/html", "Content-Length": str(len(HTML)), "ETag": 'W/"5d-1a"'})
            self.wfile.write(body)
            return
        if self.hub.mode == "redirect_loop":
            return self._respond(302, {"Location": self.path, "Content-Length": "0"})
        on_cdn = self.server is self.hub._servers[1]
        if on_cdn and path.startswith("lfs-cdn/"):
            key = parse_qs(url.query).get("key", [""])[0]
            data = self.hub.files.get(key)
            if data is None or hashlib.sha256(data).hexdigest() != path.split("/", 1)[1]:
                return self._error(404, "no such blob")
            return self._serve(key, data, {})
        if not on_cdn and path.startswith("gpt-2/models/"):
            data = self.hub.files.get(path)
            if data is None:
                return self._error(404, "BlobNotFound")
            return self._serve(path, data, {})
        if not on_cdn and "/resolve/" in path:
            return self._resolve(*path.split("/resolve/", 1))
        self._error(404, "not found")

    def _resolve(self, repo_id: str, rest: str) -> None:
        """The hub's /{repo_id}/resolve/{revision}/{filename} endpoint."""
        revision, _, filename = rest.partition("/")
        key = f"{repo_id}/{filename}"
        hub = self.hub
        if not any(k.startswith(repo_id + "/") for k in hub.files):
            return self._error(401, "Repository not found", "RepoNotFound")
        commit = hub.revisions.get(revision, revision if revision in hub.revisions.values() else None)
        if commit is None:
            return self._error(404, "Invalid rev id", "RevisionNotFound")
        if key not in hub.files:
            return self._error(404, "Entry not found", "EntryNotFound")
        data = hub.files[key]
        headers = {"X-Repo-Commit": commit}
        if not filename.endswith(LFS_SUFFIXES):
            return self._serve(key, data, headers, etag=git_blob_sha1(data))
        if self._fail(key):
            return
        sha = hashlib.sha256(data).hexdigest()
        headers.update(
            {
                "Location": f"{hub.cdn}/lfs-cdn/{sha}?key={quote(key)}",
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(sha.encode())}"',  # the pointer file's id, as on the hub
                "Content-Length": "0",
            }
        )
        self._respond(302, headers)

    def _fail(self, key: str) -> bool:
        """Answer with an injected error status if the fault says so."""
        self.log.key = key
        fault, fire = self.hub._take_failure(key)
        if fault is not None and fault.status is not None:
            self._error(fault.status, "injected", "GatedRepo" if fault.status == 403 else None)
            return True
        if fire:
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._error(fault.fail_status, "injected failure", headers=extra)
            return True
        return False

    def _serve(self, key: str, data: bytes, headers: dict[str, str], etag: str | None = None) -> None:
        if self._fail(key):
            return
        fault = self.hub.faults.get(key) or Fault()
        etag = f'"{etag or hashlib.sha256(data).hexdigest()}"'  # of the true content, whatever goes out
        if fault.flip_byte is not None:
            data = bytearray(data)
            data[fault.flip_byte] ^= 0xFF
            data = bytes(data)
        headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, start, end = 200, 0, len(data)
        ranged = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if ranged.startswith("bytes=") and not fault.ignore_range and if_range in (None, etag):
            first, _, last = ranged[6:].partition("-")
            start = int(first)
            if start >= len(data):
                return self._respond(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
            end = min(len(data), int(last) + 1) if last else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        declared = end - start if fault.content_length is None else fault.content_length
        if declared >= 0:
            headers["Content-Length"] = str(declared)
        else:
            self.close_connection = True  # no length: the body ends when the connection closes
        self._respond(status, headers)
        if self.command == "HEAD":
            return
        cut = fault.cut_after if self.hub._take_cut(key, fault) else None
        body = memoryview(data)[start:end]
        pos = 0
        try:
            while pos < len(body):
                if cut is not None and pos >= cut:
                    time.sleep(fault.stall)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                stop = len(body) if cut is None else min(cut, len(body))
                if fault.gate is not None:
                    if pos >= fault.gate_at:
                        fault.gate.wait(60)
                    else:
                        stop = min(stop, fault.gate_at)
                n = min(fault.chunk, stop - pos)
                self.wfile.write(body[pos : pos + n])
                pos += n
                with self.hub.lock:
                    self.hub.sent[key] += n
                if fault.trickle:
                    time.sleep(fault.trickle)
        except OSError:  # the client went away (killed, or gave up on a stall)
            self.close_connection = True

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        body = message.encode()
        h = {**(headers or {}), "Content-Type": "text/plain", "Content-Length": str(len(body))}
        if code:
            h["X-Error-Code"] = code
            h["X-Error-Message"] = message
        self._respond(status, h)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _respond(self, status: int, headers: dict[str, str]) -> None:
        self.log.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
