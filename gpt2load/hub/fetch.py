"""Fetch GPT-2 weights from OpenAI or the Hugging Face Hub: resumable, verified, safe to run twice at once.

Layout: `{weights_dir}/openai/{size}/` and `{weights_dir}/hf/{size}/` (`{size}@{revision}` for a non-main
revision); see manifest.py for the files in a folder. A file is recorded as verified only after a check
stronger than its length (verify.py and `_Run.verify`); a file that cannot be checked is never recorded.

Environment (read when `download` is called):
    GPT2LOAD_WEIGHTS_DIR          default weights_dir (else ./weights)
    GPT2LOAD_OPENAI_URL           OpenAI base URL (default in sources.py)
    HF_ENDPOINT, HF_TOKEN         Hugging Face Hub endpoint and token
    HF_HUB_OFFLINE                no network: use the files on disk or in the Hugging Face cache
    HF_HUB_CACHE, HF_HOME         where the Hugging Face cache is (files there are reused, not downloaded)
    GPT2LOAD_RETRY_BASE_SECONDS   first backoff wait (default 1), doubling per failed attempt ...
    GPT2LOAD_RETRY_MAX_SECONDS    ... up to this cap, which also caps Retry-After (default 60)
    GPT2LOAD_MAX_RETRIES          attempts in a row without progress before giving up (default 8)
    GPT2LOAD_READ_TIMEOUT         seconds a read may stall before the transfer resumes on a new request (60)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import requests

from ..errors import Gpt2LoadError
from ..model.config import PRESETS, resolve_size
from ..settings import Settings
from . import verify as checks
from .http import NotFound, Policy, Want, checked_url, hub_head, same_origin, transfer, with_retries
from .manifest import Manifest, digests, discard, folder_lock, link_or_copy, remove_stale, sidecar
from .sources import (
    HF_BIN,
    HF_ENDPOINT,
    HF_ENDPOINT_VAR,
    HF_REPOS,
    HF_WEIGHTS,
    MAX_BYTES,
    MAX_WEIGHTS_BYTES,
    OPENAI_DATA,
    OPENAI_DATA_SIZES,
    OPENAI_SHA256,
    OPENAI_URL,
    OPENAI_URL_VAR,
    SOURCES,
    is_repo_id,
)


def default_weights_dir(settings: Settings | None = None) -> Path:
    """`$GPT2LOAD_WEIGHTS_DIR`, else `./weights`."""
    settings = settings or Settings.from_env()
    return settings.weights_dir or Path("weights").absolute()


def hf_repo(model: str) -> tuple[str, str]:
    """(what the download folder is named after, the Hugging Face repo id): a size or alias gives its size and
    openai-community's repo; any other `owner/name` is a repo of its own."""
    try:
        size = resolve_size(model)
    except Gpt2LoadError:
        if is_repo_id(model):
            return model, model
        raise
    return size, HF_REPOS[size]


def model_dir(
    model: str,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    revision: str = "main",
    settings: Settings | None = None,
) -> Path:
    """The folder that `download` fills for this model, source and revision."""
    if weights_dir is not None:
        root = Path(weights_dir).expanduser().absolute()
    else:
        root = default_weights_dir(settings)
    name = hf_repo(model)[0].replace("/", "--")  # a repo id's folder is owner--name
    return root / source / (name if revision == "main" else f"{name}@{revision.replace('/', '--')}")


def download(
    model: str = "124M",
    source: str = "hf",
    weights_dir: str | Path | None = None,
    *,
    revision: str = "main",
    quiet: bool = False,
    settings: Settings | None = None,
) -> Path:
    """Download GPT-2 weights (or reuse complete ones) and return the folder holding the verified files.

    Args:
        model: a size ('124M', '355M', '774M', '1558M') or alias ('gpt2', 'gpt2-medium', ...), or any Hugging
            Face repo id `owner/name` whose config.json says model_type gpt2 (source 'hf').
        source: 'hf' (Hugging Face safetensors) or 'openai' (OpenAI's TensorFlow checkpoint).
        weights_dir: root of the weights folders; default `default_weights_dir()`.
        revision: Hugging Face branch, tag or commit (source 'hf' only).
        quiet: no progress bars, notes or retry messages.
        settings: gpt2load's settings (endpoints, retries, offline, the Hugging Face cache and token); default
            read from the environment now.
    """
    size, repo = hf_repo(model)
    if source not in SOURCES:
        raise Gpt2LoadError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    if source == "openai" and size not in PRESETS:
        raise Gpt2LoadError(f"{size} is a Hugging Face repo id: it downloads from the hub, drop --source openai")
    if source == "openai" and revision != "main":
        raise Gpt2LoadError(f"revision {revision!r} applies only to --source hf: drop --revision for openai")
    settings = settings or Settings.from_env()
    policy = Policy.from_settings(settings)  # environment errors surface now, before any folder is made
    if source == "hf":
        base = checked_url(settings.get(HF_ENDPOINT_VAR) or HF_ENDPOINT, HF_ENDPOINT_VAR)
    else:
        base = checked_url(settings.get(OPENAI_URL_VAR) or OPENAI_URL, OPENAI_URL_VAR)
    folder = model_dir(size, source, weights_dir, revision, settings)
    run = _Run(folder, source, size, revision, base, policy, quiet, settings, repo)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(folder, lambda: run.note(f"waiting for another download into {folder} to finish")):
            remove_stale(folder)
            run.fetch_all()
    except OSError as e:  # disk full, permissions: the network errors never get here
        raise Gpt2LoadError(
            f"cannot write {e.filename or folder} ({e.strerror or e}): check free space and "
            "permissions, or pick another --weights-dir"
        ) from None
    return folder


class _Corrupt(Exception):
    pass


class _Run:
    """One run into one folder, under its lock."""

    def __init__(
        self,
        folder: Path,
        source: str,
        size: str,
        revision: str,
        base: str,
        policy: Policy,
        quiet: bool,
        settings: Settings,
        repo: str,
    ) -> None:
        self.folder, self.source, self.size, self.revision, self.repo = folder, source, size, revision, repo
        self.base, self.policy, self.quiet, self.settings = base, policy, quiet, settings
        self.progress = not quiet and sys.stderr.isatty()
        self.manifest = Manifest(folder)
        self.session: requests.Session | None = None

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(f"gpt2load: {msg}", file=sys.stderr, flush=True)

    def fetch_all(self) -> None:
        todo = [n for n in SOURCES[self.source] if not self.manifest.complete(n)]
        if self.size not in PRESETS and self.manifest.complete(HF_BIN):  # a repo id that had no safetensors
            todo = [n for n in todo if n != HF_WEIGHTS]
        if not todo:
            return
        if _offline(self.settings):
            missing = [n for n in todo if not (self.source == "hf" and self.from_cache_offline(n))]
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
                if name == HF_WEIGHTS and self.size not in PRESETS:
                    self.fetch_repo_weights()
                else:
                    self.fetch(name)

    def from_cache_offline(self, name: str) -> bool:
        if self.from_hf_cache(name, None, self.revision):
            return True
        # a repo id whose cached snapshot has pytorch_model.bin in place of model.safetensors
        return name == HF_WEIGHTS and self.size not in PRESETS and self.from_hf_cache(HF_BIN, None, self.revision)

    def fetch_repo_weights(self) -> None:
        """A repo id's model.safetensors, else (a 404 for it: older repos) its pytorch_model.bin, verified the same
        way. The sizes keep their pinned model.safetensors."""
        try:
            self.fetch(HF_WEIGHTS)
            return
        except NotFound:
            pass
        try:
            self.fetch(HF_BIN)
            self.note(f"{self.repo} has no {HF_WEIGHTS}: used its {HF_BIN} instead")  # after: neither is one line
        except NotFound:
            raise Gpt2LoadError(
                f"{self.repo} (revision {self.revision}) has neither {HF_WEIGHTS} nor {HF_BIN}: gpt2load needs "
                "one of them; check the repo's files on the hub"
            ) from None

    def fetch(self, name: str) -> None:
        dest = self.folder / name
        if self.source == "hf":
            want, commit = self.hf_want(name)
            if self.from_hf_cache(name, want, commit or self.revision):
                return
        else:
            want = self.openai_want(name)
        if dest.exists():  # e.g. killed between the rename and the manifest
            try:
                self.manifest.add(name, self.verify(dest, want), want.etag, _how(want))
                return
            except _Corrupt:
                self.note(f"{dest} does not match upstream: downloading it again")
        part = dest.with_name(dest.name + ".part")
        transfer(self.session, want, part, self.policy, self.progress, self.note)
        try:
            sha256 = self.verify(part, want)
        except checks.NotGPT2:
            discard(part)
            raise
        except _Corrupt as e:
            discard(part)
            raise Gpt2LoadError(
                f"{name} downloaded from {want.where} is corrupt ({e}); it was deleted: check the URL and run "
                "the download again"
            ) from None
        os.replace(part, dest)
        sidecar(part).unlink(missing_ok=True)
        self.manifest.add(name, sha256, want.etag, _how(want))

    def verify(self, path: Path, want: Want) -> str:
        """sha256 of `path` if it is exactly what `want` describes, else raise _Corrupt saying why."""
        if not (want.sha256 or want.git_sha1 or want.check):
            raise _Corrupt("there is nothing to check it against")  # never recorded as verified
        have = path.stat().st_size
        if want.size is not None and have != want.size:
            raise _Corrupt(f"{have:,} bytes, expected {want.size:,}")
        sha256, git_sha1 = digests(path, git=want.git_sha1 is not None)
        if want.sha256 and sha256 != want.sha256:
            raise _Corrupt(f"sha256 {sha256}, expected {want.sha256}")
        if want.git_sha1 and git_sha1 != want.git_sha1:
            raise _Corrupt(f"git blob sha1 {git_sha1}, expected {want.git_sha1}")
        if want.check:
            try:
                want.check(path)
            except checks.NotGPT2 as e:  # another kind of model: say what it is, once, naming the repo
                raise checks.NotGPT2(f"{self.repo} {e}") from None
            except Gpt2LoadError as e:
                raise _Corrupt(str(e)) from None
        return sha256

    # --- OpenAI ---
    def openai_want(self, name: str) -> Want:
        want = Want(name, f"{self.base}/{self.size}/{name}", "openai", sha256=OPENAI_SHA256.get(name))
        want.max_bytes = MAX_BYTES.get(name)
        want.check = self._content_check(checks.OPENAI_CHECKS.get(name))
        if name == OPENAI_DATA:
            cfg = checks.check_hparams(self.folder / "hparams.json", self.size)  # verified before
            want.size = OPENAI_DATA_SIZES[self.size] if cfg == PRESETS[self.size] else 4 * cfg.n_params
        return want

    def _content_check(self, check: checks.Check | None) -> Callable[[Path], None] | None:
        """`check` bound to this folder and size (named as it is, for the manifest's "verified_by")."""
        if check is None:
            return None

        def bound(path: Path) -> None:
            check(path, self.folder, self.size)

        bound.__name__ = check.__name__
        return bound

    # --- Hugging Face ---
    def hf_want(self, name: str) -> tuple[Want, str | None]:
        url = f"{self.base}/{self.repo}/resolve/{quote(self.revision, safe='')}/{quote(name)}"
        token = _hf_token(self.settings)
        want = Want(name, url, "hf", headers={"Authorization": f"Bearer {token}"} if token else {})
        meta = with_retries(want, lambda: hub_head(self.session, want, self.policy), self.policy, self.note)
        if not meta.etag:
            raise Gpt2LoadError(
                f"{url} gave no sha256 or git etag for {name}, so it cannot be verified: is {HF_ENDPOINT_VAR} "
                f"({self.base}) a Hugging Face Hub? Fix or unset it, or try --source openai"
            )
        headers = want.headers if same_origin(meta.location, url) else {}  # never send the token to the CDN
        verified = Want(
            name,
            meta.location,
            "hf",
            url,
            size=meta.size,
            max_bytes=MAX_BYTES.get(name, MAX_WEIGHTS_BYTES),
            etag=meta.etag,
            headers=headers,
            sha256=meta.etag if len(meta.etag) == 64 else None,
            git_sha1=meta.etag if len(meta.etag) == 40 else None,
            check=self._content_check(checks.HF_CHECKS.get(name)),
        )
        return verified, meta.commit

    def from_hf_cache(self, name: str, want: Want | None, revision: str) -> bool:
        """Place the file from the shared Hugging Face cache (hard link, else copy) if it is there and verifies."""
        cached = _hf_cached(self.settings, self.repo, name, revision)
        if cached is None:
            return False
        blob = Path(os.path.realpath(cached))
        if want is None:  # offline: the cache names a blob by its etag
            etag = blob.name if blob.parent.name == "blobs" else ""
            want = Want(
                name,
                str(blob),
                "hf",
                sha256=etag if len(etag) == 64 else None,
                git_sha1=etag if len(etag) == 40 else None,
                etag=etag or None,
                check=self._content_check(checks.HF_CHECKS.get(name)),
            )
        part = self.folder / (name + ".part")
        discard(part)
        link_or_copy(blob, part)
        try:
            sha256 = self.verify(part, want)
        except checks.NotGPT2:
            discard(part)
            raise
        except _Corrupt as e:
            discard(part)
            self.note(f"{cached} in the Hugging Face cache is not usable ({e}): ignoring it")
            return False
        os.replace(part, self.folder / name)
        self.manifest.add(name, sha256, want.etag, _how(want))
        return True


def _how(want: Want) -> str:
    """How a file was verified, in words, for the manifest."""
    ways = ["hub sha256" if want.origin else "pinned sha256"] if want.sha256 else []
    ways += ["hub git blob sha1"] if want.git_sha1 else []
    ways += [f"content check ({want.check.__name__})"] if want.check else []
    return ", ".join(ways)


def _offline(settings: Settings) -> bool:
    value = settings.get("HF_HUB_OFFLINE") or settings.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


# Hugging Face's cache and token are found as huggingface_hub finds them, without importing it: it reads the
# environment once, at import, and fails to import at all when HF_ENDPOINT is malformed.


def _hf_home(settings: Settings) -> Path:
    if settings.get("HF_HOME"):
        return Path(settings.get("HF_HOME")).expanduser()
    cache = settings.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "huggingface")


def _hf_cache_dir(settings: Settings) -> Path:
    """The Hugging Face cache folder, as the settings' environment names it."""
    explicit = settings.get("HF_HUB_CACHE") or settings.get("HUGGINGFACE_HUB_CACHE")
    return Path(explicit).expanduser() if explicit else _hf_home(settings) / "hub"


def _hf_cached(settings: Settings, repo_id: str, name: str, revision: str) -> str | None:
    """The path of `name` at `revision` (a branch, tag or commit) in the Hugging Face cache, if it is there."""
    repo = _hf_cache_dir(settings) / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo / "refs" / revision).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        commit = revision  # a commit hash names its snapshot directly
    path = repo / "snapshots" / commit / name
    return str(path) if "/" not in commit and path.is_file() else None


def _hf_token(settings: Settings) -> str | None:
    """HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), else the token `hf auth login` saved."""
    token = settings.get("HF_TOKEN") or settings.get("HUGGING_FACE_HUB_TOKEN")
    if token is None:
        try:
            where = settings.get("HF_TOKEN_PATH") or _hf_home(settings) / "token"
            token = Path(where).expanduser().read_text().strip()
        except OSError:
            return None
    return token.strip() or None
