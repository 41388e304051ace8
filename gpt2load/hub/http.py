"""Ranged, resumable HTTP GET with bounded retries, and the hub's metadata HEAD.

What is retried: connection errors, timeouts, cuts, HTTP 408/429/5xx. What fails at once, with one line: a
malformed or non-HTTP URL, a TLS verification failure, a redirect loop, other HTTP statuses. A name-resolution
failure is retried only `DNS_RETRIES` times (an offline machine should hear so in seconds, not minutes).

Progress is the high-water mark of bytes on disk: an attempt that restarts from byte 0 (a server ignoring
Range) and is cut where the last one was is a failure, not progress, so such a server is given up on.
"""

from __future__ import annotations

import email.utils
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from tqdm import tqdm

from ..errors import Gpt2LoadError
from ..settings import Settings
from .manifest import discard, read_json, sidecar, write_json
from .sources import OTHER_SOURCE

CHUNK_BYTES = 1024 * 1024  # largest read; written as soon as it arrives
CONNECT_TIMEOUT = 10.0
DNS_RETRIES = 2
MAX_ATTEMPTS = 200  # per file, whatever the progress: a last bound on a server that trickles forever
MAX_HUB_REDIRECTS = 10

T = TypeVar("T")


# --- the retry policy, from the settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How hard to try. `from_settings()` takes the GPT2LOAD_* variables' values (documented in hub/fetch.py)."""

    retry_base: float = 1.0  # first backoff wait, doubling per failed attempt ...
    retry_max: float = 60.0  # ... up to this cap, which also caps Retry-After
    max_retries: int = 8  # failed attempts in a row (without new bytes) before giving up
    read_timeout: float = 60.0  # seconds a read may stall before the transfer resumes on a new request

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        number = settings.number
        return cls(
            retry_base=number("GPT2LOAD_RETRY_BASE_SECONDS", cls.retry_base, 0.0),
            retry_max=number("GPT2LOAD_RETRY_MAX_SECONDS", cls.retry_max, 0.0),
            max_retries=int(number("GPT2LOAD_MAX_RETRIES", cls.max_retries, 0, whole=True)),
            read_timeout=number("GPT2LOAD_READ_TIMEOUT", cls.read_timeout, 0.001),
        )

    @property
    def timeout(self) -> tuple[float, float]:
        return (CONNECT_TIMEOUT, self.read_timeout)


def checked_url(url: str, variable: str) -> str:
    """`url` without a trailing slash if it is an http(s) URL with a host, else one clear error naming `variable`."""
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - raises ValueError on a bad port
        ok = u.scheme in ("http", "https") and bool(u.hostname)
        why = "" if ok else "it needs http:// or https:// and a host"
    except ValueError as e:
        ok, why = False, str(e)
    if not ok:
        raise Gpt2LoadError(f"{variable}={url!r} is not a usable URL ({why}): fix or unset it")
    return url.rstrip("/")


# --- what to fetch -------------------------------------------------------------------------------------------


@dataclass
class Want:
    """What a complete file must be, and where it comes from."""

    name: str
    url: str  # where to GET it
    source: str  # 'hf' or 'openai', for the advice in errors
    origin: str = ""  # what to call it in messages: the hub's resolve URL rather than a signed CDN one
    size: int | None = None
    max_bytes: int | None = None  # hard cap when the size is not known
    sha256: str | None = None
    git_sha1: str | None = None  # hub etag of a plain git file: sha1 of b"blob {size}\0" + content
    etag: str | None = None  # upstream version, known before the transfer (hub)
    headers: dict[str, str] = field(default_factory=dict)
    check: Callable[[Path], None] | None = None  # content check, raises Gpt2LoadError

    @property
    def where(self) -> str:
        return self.origin or self.url


class NotFound(Gpt2LoadError):
    """HTTP 404: the file is not there (a repo id without model.safetensors falls back on pytorch_model.bin)."""


class Transient(Exception):
    """A failure worth retrying: connection error, timeout, cut, 408/429/5xx."""

    def __init__(self, reason: str, retry_after: float | None = None, progressed: bool = False, dns: bool = False):
        super().__init__(reason)
        self.retry_after, self.progressed, self.dns = retry_after, progressed, dns


def with_retries(want: Want, attempt: Callable[[], T], policy: Policy, note: Callable[[str], None]) -> T:
    """attempt() until it returns, backing off exponentially after transient failures, saying so on each retry.

    The count of failures in a row resets only when an attempt got further into the file than any before.
    """
    failures = attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except Transient as e:
            failures = 1 if e.progressed else failures + 1
            limit = DNS_RETRIES if e.dns else policy.max_retries
            if failures > limit or attempts >= MAX_ATTEMPTS:
                retries = f"{limit} retries" if failures > limit else f"{attempts} attempts"
                advice = (
                    "offline? check the host name, or set HF_HUB_OFFLINE=1 to use files already on disk"
                    if e.dns
                    else "check the connection and the URL, then run the download again; it resumes where it stopped"
                )
                raise Gpt2LoadError(f"{want.name}: giving up on {want.where} after {retries} ({e}): {advice}") from None
            wait = min(policy.retry_max, max(policy.retry_base * 2 ** (failures - 1), e.retry_after or 0.0))
            note(f"{want.name}: {e}; retry {failures} of {limit} in {wait:.3g} s")
            time.sleep(wait)


def raise_for_status(want: Want, url: str, status: int, headers) -> NoReturn:
    """Raise Transient for statuses worth retrying, else Gpt2LoadError saying what to do."""
    if status in (408, 429) or status >= 500:
        raise Transient(f"HTTP {status}", _retry_after(headers.get("Retry-After")))
    other = OTHER_SOURCE[want.source]
    if status == 404:
        what = "check the model name and --revision" if want.source == "hf" else "check the model name"
        raise NotFound(f"{want.name} not found (HTTP 404) at {url}: {what}, or try --source {other}")
    if status in (401, 403):
        raise Gpt2LoadError(
            f"access to {want.name} denied (HTTP {status}) at {url}: set HF_TOKEN if the "
            f"repository needs a login, or try --source {other}"
        )
    raise Gpt2LoadError(f"{want.name}: unexpected HTTP {status} from {url}: try again later or --source {other}")


def _caused_by_dns(e: BaseException) -> bool:
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (urllib3.exceptions.NameResolutionError, socket.gaierror)):
            return True
        stack += [x.__cause__, x.__context__, getattr(x, "reason", None)]
        stack += [a for a in x.args if isinstance(a, BaseException)]
    return False


def request_failure(e: requests.RequestException | urllib3.exceptions.HTTPError, want: Want, progressed: bool):
    """The exception to raise for a failed request: Transient if another try may help, else Gpt2LoadError."""
    if isinstance(e, requests.exceptions.SSLError):
        return Gpt2LoadError(
            f"TLS failed for {want.name} at {want.where} ({_short(e)}): retrying will not help; check the URL, "
            "the system's CA certificates or REQUESTS_CA_BUNDLE"
        )
    if isinstance(e, requests.TooManyRedirects):
        return Gpt2LoadError(f"{want.name}: {want.where} redirects in a loop: check GPT2LOAD_OPENAI_URL / HF_ENDPOINT")
    if isinstance(e, requests.ConnectionError) and _caused_by_dns(e):
        host = urlsplit(want.url).hostname
        return Transient(f"cannot resolve host {host}", dns=True)
    transient = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    if isinstance(e, (*transient, urllib3.exceptions.HTTPError)):
        return Transient(_short(e), progressed=progressed)
    return Gpt2LoadError(f"cannot fetch {want.name} from {want.where} ({_short(e)}): check the URL")


def _short(e: BaseException) -> str:
    """An exception as a short phrase: its type and the innermost reason, on one line."""
    reason = getattr(e, "reason", None) or (e.args[0] if e.args and isinstance(e.args[0], BaseException) else None)
    inner = getattr(reason, "reason", None) or reason
    text = f"{type(e).__name__}: {inner or e}"
    return " ".join(text.split())[:200]


# --- the hub's metadata --------------------------------------------------------------------------------------


@dataclass
class HubMeta:
    location: str  # where the bytes are (the CDN for LFS files)
    etag: str  # the hub's id of the content: sha256 (LFS) or git blob sha1, lowercase hex, else ""
    size: int | None
    commit: str | None


def hub_head(session: requests.Session, want: Want, policy: Policy) -> HubMeta:
    """One HEAD of a hub resolve URL (following same-origin redirects), as huggingface_hub's metadata call does."""
    url, seen = want.url, set()
    for _ in range(MAX_HUB_REDIRECTS):
        seen.add(url)
        try:
            r = session.head(url, headers=want.headers, allow_redirects=False, timeout=policy.timeout)
        except requests.RequestException as e:
            raise request_failure(e, want, False) from None
        location = urljoin(url, r.headers["Location"]) if r.headers.get("Location") else None
        if r.is_redirect and location and same_origin(location, url):
            if location in seen:
                break
            url = location  # a renamed repo: the hub answers with a relative redirect
            continue
        if not (200 <= r.status_code < 300 or r.is_redirect):
            raise_for_status(want, url, r.status_code, r.headers)
        etag = r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or ""
        etag = etag.strip().removeprefix("W/").strip('"').lower()
        size = r.headers.get("X-Linked-Size") or r.headers.get("Content-Length") or ""
        return HubMeta(
            location or url,
            etag if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", etag) else "",
            int(size) if size.isdigit() else None,
            r.headers.get("X-Repo-Commit"),
        )
    raise Gpt2LoadError(f"{want.name}: {want.where} redirects in a loop: check HF_ENDPOINT")


def same_origin(a: str, b: str) -> bool:
    def origin(url: str) -> tuple:
        u = urlsplit(url)
        return u.scheme, u.hostname, u.port or {"http": 80, "https": 443}.get(u.scheme)

    return origin(a) == origin(b)


# --- the transfer --------------------------------------------------------------------------------------------


def transfer(
    session: requests.Session, want: Want, part: Path, policy: Policy, progress: bool, note: Callable[[str], None]
) -> None:
    """Download want.url into `part`, resuming what an earlier run left there.

    A sidecar `part.json`, written before any byte, records the version being fetched (the hub's etag, else the
    server's ETag) and its size, so a partial file of another upstream version is discarded instead of being
    completed with foreign bytes. The server's own ETag goes in If-Range for the same reason.
    """
    side = sidecar(part)
    state = read_json(side)
    if part.exists() and not (
        state
        and (want.etag is None or state.get("etag") == want.etag)
        and (want.size is None or state.get("size") in (None, want.size))
        and part.stat().st_size <= (state.get("size") or float("inf"))
    ):
        discard(part)
        state = None
    cap = want.size if want.size is not None else want.max_bytes
    best = part.stat().st_size if part.exists() else 0  # the furthest any attempt got

    def attempt() -> None:
        nonlocal state, best
        offset = part.stat().st_size if part.exists() else 0
        headers = dict(want.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = (state or {}).get("validator")
            if validator and not validator.startswith("W/"):
                headers["If-Range"] = validator  # changed upstream => the server sends all of it (200)
        written = 0
        try:
            with session.get(want.url, headers=headers, stream=True, timeout=policy.timeout) as r:
                total = _total_size(r)
                if r.status_code == 416 and offset:
                    if total == offset:  # killed after the last byte, before the rename
                        return
                    discard(part)
                    raise Transient(f"server has {total} bytes, fewer than the partial file: restarting")
                if r.status_code not in (200, 206):
                    raise_for_status(want, want.url, r.status_code, r.headers)
                validator = r.headers.get("ETag")
                if r.status_code == 206 and (
                    _range_start(r) != offset or (state and state.get("validator") not in (None, validator))
                ):
                    discard(part)
                    raise Transient("server answered another range or version: restarting")
                _check_total(want, total, cap)
                if r.status_code == 200:  # the whole file (Range ignored, or If-Range failed): start over
                    discard(part)
                    offset = 0
                if offset == 0 or not state:
                    state = {"etag": want.etag or validator, "validator": validator, "size": total}
                    write_json(side, state)
                with open(part, "ab") as f, _bar(want.name, total, offset, progress) as bar:
                    for chunk in _chunks(r):
                        if cap is not None and offset + written + len(chunk) > cap:
                            f.close()
                            discard(part)
                            raise Gpt2LoadError(
                                f"{want.where} sent more than the {cap:,} bytes {want.name} can have: the server "
                                "is not sending the expected file; check the URL or try the other --source"
                            )
                        f.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
                if total is not None and offset + written != total:
                    raise Transient(f"connection closed after {offset + written:,} of {total:,} bytes")
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise request_failure(e, want, offset + written > best) from None
        except Transient as e:
            e.progressed = offset + written > best
            raise
        finally:
            best = max(best, offset + written)

    with_retries(want, attempt, policy, note)


def _check_total(want: Want, total: int | None, cap: int | None) -> None:
    if total is None:
        return
    if want.size is not None and total != want.size:
        raise Gpt2LoadError(
            f"{want.url} has {total:,} bytes but {want.name} must have {want.size:,}: "
            "the server holds another file; try the other --source"
        )
    if cap is not None and total > cap:
        raise Gpt2LoadError(
            f"{want.url} has {total:,} bytes, more than {want.name} can have ({cap:,}): "
            "the server holds another file; check the URL or try the other --source"
        )


def _bar(name: str, total: int | None, initial: int, progress: bool) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
    )


def _chunks(r: requests.Response) -> Iterator[bytes]:
    """The body as it arrives, undecoded. urllib3 2's read1 hands over every byte received before a cut;
    iter_content would drop the partial chunk it was filling."""
    read1 = getattr(r.raw, "read1", None)
    if read1 is None:  # urllib3 1.x
        yield from r.iter_content(CHUNK_BYTES)
        return
    while chunk := read1(CHUNK_BYTES):
        yield chunk


def _total_size(r: requests.Response) -> int | None:
    m = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", r.headers.get("Content-Range", ""))
    if m:
        return int(m.group(1))
    if r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
        return int(r.headers["Content-Length"])
    return None


def _range_start(r: requests.Response) -> int | None:
    m = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", r.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
