"""Fetch GPT-2 weights from OpenAI or the Hugging Face Hub: resumable, verified, safe to run twice at once.

Layout: `{weights_dir}/openai/{size}/` and `{weights_dir}/hf/{size}/` (`{size}@{revision}` for a non-main
revision). In a folder, a file under its final name is complete and verified; `NAME.part` (with its sidecar
`NAME.part.json`) is an unfinished download the next run resumes; `.gpt2load-download.json` records what was
verified; `.gpt2load.lock` serialises runs into the folder.

Environment:
    GPT2LOAD_WEIGHTS_DIR          default weights_dir (else ./weights)
    GPT2LOAD_OPENAI_URL           OpenAI base URL (default below)
    HF_ENDPOINT, HF_TOKEN         Hugging Face Hub endpoint and token, read at call time
    HF_HUB_OFFLINE                no network: use the files on disk or in the Hugging Face cache
    HF_HUB_CACHE, HF_HOME         where the Hugging Face cache is (files there are reused, not downloaded)
    GPT2LOAD_RETRY_BASE_SECONDS   first backoff wait (default 1), doubling per failed attempt ...
    GPT2LOAD_RETRY_MAX_SECONDS    ... up to this cap, which also caps Retry-After (default 60)
    GPT2LOAD_MAX_RETRIES          attempts in a row without progress before giving up (default 8)
    GPT2LOAD_READ_TIMEOUT         seconds a read may stall before the transfer resumes on a new request (60)
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from .config import PRESETS, read_hparams, resolve_size
from .errors import Gpt2LoadError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def _env_number(name: str, default: float, kind: type = float):
    try:
        return kind(os.environ.get(name) or default)
    except ValueError:
        raise Gpt2LoadError(f"{name}={os.environ[name]!r} is not a number: fix or unset it") from None


RETRY_BASE_SECONDS: float = _env_number("GPT2LOAD_RETRY_BASE_SECONDS", 1.0)
RETRY_MAX_SECONDS: float = _env_number("GPT2LOAD_RETRY_MAX_SECONDS", 60.0)
MAX_RETRIES: int = _env_number("GPT2LOAD_MAX_RETRIES", 8, int)
TIMEOUT: tuple[float, float] = (10.0, _env_number("GPT2LOAD_READ_TIMEOUT", 60.0))  # (connect, read) seconds
CHUNK_BYTES = 1024 * 1024  # largest read; written as soon as it arrives

# --- the sources, as data ------------------------------------------------------------------------------------

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_DATA = "model.ckpt.data-00000-of-00001"
# Order matters: hparams.json (its size) and the index (its CRCs) are complete before the data file starts.
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
    OPENAI_DATA,
)
OPENAI_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# The data file is the float32 parameters back to back: 4 bytes x parameter count. Pinned for the presets
# (used when hparams.json matches the preset); any other hparams.json gets 4 x its own parameter count.
OPENAI_DATA_SIZES = {"124M": 497_759_232, "355M": 1_419_292_672, "774M": 3_096_120_320, "1558M": 6_230_444_800}

HF_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
HF_FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")

SOURCES = {"hf": HF_FILES, "openai": OPENAI_FILES}
_OTHER = {"hf": "openai", "openai": "hf"}
_MANIFEST = ".gpt2load-download.json"
_LOCK = ".gpt2load.lock"


def default_weights_dir() -> Path:
    """`$GPT2LOAD_WEIGHTS_DIR`, else `./weights`."""
    return Path(os.environ.get("GPT2LOAD_WEIGHTS_DIR") or "weights").expanduser().absolute()


def model_dir(model: str, source: str = "hf", weights_dir: str | Path | None = None, revision: str = "main") -> Path:
    """The folder that `download` fills for this model, source and revision."""
    root = Path(weights_dir).expanduser().absolute() if weights_dir is not None else default_weights_dir()
    size = resolve_size(model)
    return root / source / (size if revision == "main" else f"{size}@{revision.replace('/', '--')}")


def download(
    model: str = "124M",
    source: str = "hf",
    weights_dir: str | Path | None = None,
    *,
    revision: str = "main",
    quiet: bool = False,
) -> Path:
    """Download GPT-2 weights (or reuse complete ones) and return the folder holding the verified files.

    Args:
        model: a size ('124M', '355M', '774M', '1558M') or alias ('gpt2', 'gpt2-medium', ...).
        source: 'hf' (Hugging Face safetensors) or 'openai' (OpenAI's TensorFlow checkpoint).
        weights_dir: root of the weights folders; default `default_weights_dir()`.
        revision: Hugging Face branch, tag or commit (source 'hf' only).
        quiet: no progress bars or notes.
    """
    size = resolve_size(model)
    if source not in SOURCES:
        raise Gpt2LoadError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    if source == "openai" and revision != "main":
        raise Gpt2LoadError(f"revision {revision!r} applies only to --source hf: drop --revision for openai")
    folder = model_dir(size, source, weights_dir, revision)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _folder_lock(folder, quiet):
            _Run(folder, source, size, revision, quiet).fetch_all()
    except OSError as e:  # disk full, permissions: the network errors never get here
        raise Gpt2LoadError(
            f"cannot write {e.filename or folder} ({e.strerror or e}): check free space and "
            "permissions, or pick another --weights-dir"
        ) from None
    return folder


# --- one run into one folder ---------------------------------------------------------------------------------


@dataclass
class _Want:
    """What a complete file must be, and where it comes from."""

    name: str
    url: str  # where to GET it
    origin: str = ""  # what to call it in messages: the hub's resolve URL rather than a signed CDN one
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None  # hub etag of a plain git file: sha1 of b"blob {size}\0" + content
    etag: str | None = None  # upstream version, known before the transfer (hub)
    headers: dict[str, str] | None = None
    check: Callable[[Path], None] | None = None  # extra content check, raises Gpt2LoadError


class _Corrupt(Exception):
    pass


class _Run:
    def __init__(self, folder: Path, source: str, size: str, revision: str, quiet: bool) -> None:
        self.folder, self.source, self.size, self.revision, self.quiet = folder, source, size, revision, quiet
        self.progress = not quiet and sys.stderr.isatty()
        self.manifest = _Manifest(folder)
        self.session: requests.Session | None = None

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def fetch_all(self) -> None:
        for stale in self.folder.glob(".verify-*"):  # left by a run killed mid-verification
            shutil.rmtree(stale, ignore_errors=True)
        todo = [n for n in SOURCES[self.source] if not self.manifest.complete(n)]
        if not todo:
            return
        if _offline():
            missing = [n for n in todo if not (self.source == "hf" and self.from_hf_cache(n, None, self.revision))]
            if missing:
                cache = " (nor does the Hugging Face cache have them)" if self.source == "hf" else ""
                raise Gpt2LoadError(
                    f"HF_HUB_OFFLINE is set but {self.folder} lacks {', '.join(missing)}{cache}: "
                    "unset HF_HUB_OFFLINE to download them"
                )
            return
        with requests.Session() as self.session:
            self.session.headers.update({"User-Agent": "gpt2load", "Accept-Encoding": "identity"})
            for name in todo:
                self.fetch(name)

    def fetch(self, name: str) -> None:
        dest = self.folder / name
        if self.source == "hf":
            want, commit = self.hf_want(name)
            if self.from_hf_cache(name, want, commit or self.revision):
                return
        else:
            want = self.openai_want(name)
        if dest.exists() and (want.sha256 or want.git_sha1 or want.check):  # e.g. killed before the manifest
            try:
                self.manifest.add(name, self.verify(dest, want), want)
                return
            except _Corrupt:
                self.note(f"{dest} does not match upstream: downloading it again")
        part = _transfer(self.session, self.source, want, dest, self.progress)
        try:
            sha256 = self.verify(part, want)
        except _Corrupt as e:
            _discard(part)
            raise Gpt2LoadError(
                f"{name} downloaded from {want.origin or want.url} is corrupt ({e}); it was deleted: run the "
                "download again"
            ) from None
        os.replace(part, dest)
        _sidecar(part).unlink(missing_ok=True)
        self.manifest.add(name, sha256, want)

    def verify(self, path: Path, want: _Want) -> str:
        """sha256 of `path` if it is exactly what `want` describes, else raise _Corrupt saying why."""
        have = path.stat().st_size
        if want.size is not None and have != want.size:
            raise _Corrupt(f"{have:,} bytes, expected {want.size:,}")
        sha256, git_sha1 = _digests(path, git=want.git_sha1 is not None)
        if want.sha256 and sha256 != want.sha256:
            raise _Corrupt(f"sha256 {sha256}, expected {want.sha256}")
        if want.git_sha1 and git_sha1 != want.git_sha1:
            raise _Corrupt(f"git blob sha1 {git_sha1}, expected {want.git_sha1}")
        if want.check:
            try:
                want.check(path)
            except Gpt2LoadError as e:
                raise _Corrupt(str(e)) from None
        return sha256

    # --- OpenAI ---
    def openai_want(self, name: str) -> _Want:
        base = (os.environ.get("GPT2LOAD_OPENAI_URL") or OPENAI_URL).rstrip("/")
        want = _Want(name, f"{base}/{self.size}/{name}", sha256=OPENAI_SHA256.get(name))
        if name == OPENAI_DATA:
            cfg = read_hparams(self.folder / "hparams.json")
            want.size = OPENAI_DATA_SIZES[self.size] if cfg == PRESETS[self.size] else 4 * cfg.n_params
            want.check = self.check_tf_data
        return want

    def check_tf_data(self, data: Path) -> None:
        """Every tensor's CRC32C, via the (complete) index, before the data file gets its final name."""
        from .tfcheckpoint import verify_checkpoint  # imports torch: only when needed

        # verify_checkpoint wants `prefix.index` next to `prefix.data-...`: stage links under those names.
        with tempfile.TemporaryDirectory(prefix=".verify-", dir=self.folder) as tmp:
            _link_or_copy(self.folder / "model.ckpt.index", Path(tmp) / "model.ckpt.index")
            _link_or_copy(data, Path(tmp) / OPENAI_DATA)
            try:
                verify_checkpoint(Path(tmp) / "model.ckpt")
            except Gpt2LoadError as e:  # keep its "what", drop its advice and the staging path
                raise Gpt2LoadError(str(e).replace(tmp + os.sep, "").rsplit(": ", 1)[0]) from None

    # --- Hugging Face ---
    def hf_want(self, name: str) -> tuple[_Want, str | None]:
        from huggingface_hub import constants, get_hf_file_metadata, get_token, hf_hub_url
        from huggingface_hub.utils import HfHubHTTPError

        # huggingface_hub reads HF_ENDPOINT once, at import: read it now so a later setting counts too.
        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        url = hf_hub_url(HF_REPOS[self.size], name, revision=self.revision, endpoint=endpoint)
        token = get_token()

        def head():
            try:
                return get_hf_file_metadata(
                    url, token=token or False, timeout=TIMEOUT[1], endpoint=endpoint, library_name="gpt2load"
                )
            except HfHubHTTPError as e:
                _raise_for_status("hf", name, url, e.response.status_code, e.response.headers)
            except _transport_errors() as e:
                raise _Transient(f"{type(e).__name__}: {e}") from None

        meta = _with_retries(name, url, head)
        etag = (meta.etag or "").lower()
        headers = {}
        if token and _origin(meta.location) == _origin(url):  # never send the token to the CDN
            headers["Authorization"] = f"Bearer {token}"
        want = _Want(
            name,
            meta.location,
            url,
            size=meta.size,
            etag=meta.etag,
            headers=headers,
            sha256=etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None,
            git_sha1=etag if re.fullmatch(r"[0-9a-f]{40}", etag) else None,
        )
        return want, meta.commit_hash

    def from_hf_cache(self, name: str, want: _Want | None, revision: str) -> bool:
        """Place the file from the shared Hugging Face cache (hard link, else copy) if it is there and verifies."""
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(HF_REPOS[self.size], name, cache_dir=_hf_cache_dir(), revision=revision)
        if not isinstance(cached, str):
            return False
        blob = Path(os.path.realpath(cached))
        if want is None:  # offline: the cache names a blob by its etag
            etag = blob.name if blob.parent.name == "blobs" else ""
            want = _Want(
                name, str(blob), sha256=etag if len(etag) == 64 else None, git_sha1=etag if len(etag) == 40 else None
            )
        part = self.folder / (name + ".part")
        _discard(part)
        _link_or_copy(blob, part)
        try:
            sha256 = self.verify(part, want)
        except _Corrupt as e:
            _discard(part)
            self.note(f"{cached} in the Hugging Face cache is not usable ({e}): ignoring it")
            return False
        os.replace(part, self.folder / name)
        self.manifest.add(name, sha256, want)
        return True


# --- the transfer ------------------------------------------------------------------------------------------


def _raise_for_status(source: str, name: str, url: str, status: int, headers) -> NoReturn:
    """Raise _Transient for statuses worth retrying, else Gpt2LoadError saying what to do."""
    if status in (408, 429) or status >= 500:
        raise _Transient(f"HTTP {status}", _retry_after(headers.get("Retry-After")))
    other = _OTHER[source]
    if status == 404:
        what = "check the model name and --revision" if source == "hf" else "check the model name"
        raise Gpt2LoadError(f"{name} not found (HTTP 404) at {url}: {what}, or try --source {other}")
    if status in (401, 403):
        raise Gpt2LoadError(
            f"access to {name} denied (HTTP {status}) at {url}: set HF_TOKEN if the "
            f"repository needs a login, or try --source {other}"
        )
    raise Gpt2LoadError(f"{name}: unexpected HTTP {status} from {url}: try again later or --source {other}")


T = TypeVar("T")


class _Transient(Exception):
    """A failure worth retrying: connection error, timeout, 429/5xx."""

    def __init__(self, reason: str, retry_after: float | None = None, progressed: bool = False) -> None:
        super().__init__(reason)
        self.retry_after, self.progressed = retry_after, progressed


def _with_retries(name: str, url: str, attempt: Callable[[], T]) -> T:
    """attempt() until it returns, backing off exponentially after transient failures.

    The failure count resets whenever an attempt made progress, so a flaky but moving transfer never gives up.
    """
    failures = 0
    while True:
        try:
            return attempt()
        except _Transient as e:
            failures = 1 if e.progressed else failures + 1
            if failures > MAX_RETRIES:
                raise Gpt2LoadError(
                    f"{name}: giving up on {url} after {MAX_RETRIES} retries ({e}): check the "
                    "connection and run the download again; it resumes where it stopped"
                ) from None
            wait = RETRY_BASE_SECONDS * 2 ** (failures - 1)
            time.sleep(min(RETRY_MAX_SECONDS, max(wait, e.retry_after or 0.0)))


def _transfer(session: requests.Session, source: str, want: _Want, dest: Path, progress: bool) -> Path:
    """Download want.url into `dest.part`, resuming what an earlier run left there; return the .part path.

    A sidecar `dest.part.json`, written before any byte, records the version being fetched (the hub's etag,
    else the server's ETag) and its size, so a partial file of another upstream version is discarded instead
    of being completed with foreign bytes. The server's own ETag goes in If-Range for the same reason.
    """
    part = dest.with_name(dest.name + ".part")
    side = _sidecar(part)
    state = _read_json(side)
    if part.exists() and not (
        state
        and (want.etag is None or state.get("etag") == want.etag)
        and (want.size is None or state.get("size") in (None, want.size))
        and part.stat().st_size <= (state.get("size") or float("inf"))
    ):
        _discard(part)
        state = None

    def attempt():
        nonlocal state
        offset = part.stat().st_size if part.exists() else 0
        headers = dict(want.headers or {})
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = (state or {}).get("validator")
            if validator and not validator.startswith("W/"):
                headers["If-Range"] = validator  # changed upstream => the server sends all of it (200)
        written = 0
        try:
            with session.get(want.url, headers=headers, stream=True, timeout=TIMEOUT) as r:
                total = _total_size(r)
                if r.status_code == 416 and offset:
                    if total == offset:  # killed after the last byte, before the rename
                        return None
                    _discard(part)
                    raise _Transient(f"server has {total} bytes, fewer than the partial file: restarting")
                if r.status_code not in (200, 206):
                    _raise_for_status(source, want.name, want.url, r.status_code, r.headers)
                validator = r.headers.get("ETag")
                if r.status_code == 206 and (
                    _range_start(r) != offset or (state and state.get("validator") not in (None, validator))
                ):
                    _discard(part)
                    raise _Transient("server answered another range or version: restarting")
                if want.size is not None and total is not None and total != want.size:
                    raise Gpt2LoadError(
                        f"{want.url} has {total:,} bytes but {want.name} must have {want.size:,}: "
                        "the server holds another file; try the other --source"
                    )
                if r.status_code == 200:
                    _discard(part)
                    offset = 0
                if offset == 0 or not state:
                    state = {"etag": want.etag or validator, "validator": validator, "size": total}
                    _write_json(side, state)
                with (
                    open(part, "ab") as f,
                    tqdm(
                        total=total,
                        initial=offset,
                        desc=want.name,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        disable=not progress,
                    ) as bar,
                ):
                    for chunk in _chunks(r):
                        f.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
                if total is not None and offset + written != total:
                    raise _Transient("connection closed early", progressed=written > 0)
                return None
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
        ) as e:
            raise _Transient(f"{type(e).__name__}", progressed=written > 0) from None
        except requests.RequestException as e:  # a malformed URL or the like: retrying will not help
            raise Gpt2LoadError(
                f"cannot fetch {want.name} from {want.url} ({e}): check GPT2LOAD_OPENAI_URL / HF_ENDPOINT"
            ) from None

    _with_retries(want.name, want.url, attempt)
    return part


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


# --- files on disk -----------------------------------------------------------------------------------------


class _Manifest:
    """`.gpt2load-download.json`: size, mtime and sha256 of every file verified into the folder.

    A file counts as complete without reading it when its size and mtime still match; if only the mtime
    changed (a copy without -p), re-hashing against the recorded sha256 decides. Written under the folder lock.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / _MANIFEST
        self.files: dict[str, dict] = (_read_json(self.path) or {}).get("files", {})

    def complete(self, name: str) -> bool:
        entry, path = self.files.get(name), self.path.parent / name
        if not entry or not path.is_file():
            return False
        st = path.stat()
        if st.st_size != entry.get("size"):
            return False
        if st.st_mtime_ns != entry.get("mtime_ns"):
            if _digests(path)[0] != entry.get("sha256"):
                return False
            self.files[name] = {**entry, "mtime_ns": st.st_mtime_ns}
            self._save()
        return True

    def add(self, name: str, sha256: str, want: _Want) -> None:
        st = (self.path.parent / name).stat()
        self.files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "etag": want.etag}
        self._save()

    def _save(self) -> None:
        _write_json(self.path, {"files": self.files})


def _digests(path: Path, git: bool = False) -> tuple[str, str | None]:
    """sha256 of the file, and its git blob sha1 if asked."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % path.stat().st_size) if git else None
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha256.update(block)
            if sha1:
                sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 else None


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    # unlink, never truncate: the .part may be a hard link into the Hugging Face cache
    part.unlink(missing_ok=True)
    _sidecar(part).unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links there
        shutil.copyfile(src, dst)


@contextmanager
def _folder_lock(folder: Path, quiet: bool) -> Iterator[None]:
    """Hold an exclusive lock on the folder for the whole run.

    Why one folder lock rather than per-process temp names: resuming needs one stable `.part` name per file,
    and two runs must not append to it at once. The second run waits, then finds the files complete in the
    manifest and transfers nothing. The kernel drops a flock when its process dies, even by kill -9, so there
    are no stale locks to clean up; the lock file itself stays (deleting it would race with a waiter).
    """
    with open(folder / _LOCK, "a+b") as fh:
        if not _try_lock(fh, blocking=False):
            if not quiet:
                print(f"waiting for another download into {folder} to finish", file=sys.stderr)
            _try_lock(fh, blocking=True)
        yield  # closing the file releases the lock


def _try_lock(fh, blocking: bool) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False
    while True:  # msvcrt's own blocking mode gives up after 10 s
        try:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not blocking:
                return False
            time.sleep(0.5)


# --- environment -------------------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def _hf_cache_dir() -> str:
    """The Hugging Face cache folder, from the environment as it is now (huggingface_hub fixes it at import)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _origin(url: str) -> tuple[str, str | None, int | None]:
    u = urlsplit(url)
    return u.scheme, u.hostname, u.port or {"http": 80, "https": 443}.get(u.scheme)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network errors huggingface_hub may raise: requests' (OSError) in old releases, httpx's in newer ones."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
