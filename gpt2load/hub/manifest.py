"""The state of a download folder on disk: the manifest of verified files, partial files, the folder lock.

In a folder, a file under its final name is complete and verified; `NAME.part` (with its sidecar
`NAME.part.json`) is an unfinished download the next run resumes; `.gpt2load-download.json` records what was
verified; `.gpt2load.lock` serialises runs into the folder and is removed when the run ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

MANIFEST = ".gpt2load-download.json"
LOCK = ".gpt2load.lock"
# Temp files of our own naming that only the lock holder writes: any found under the lock are left by a kill.
_STALE = re.compile(rf"(?:{re.escape(MANIFEST)}|.+\.part\.json)\.\d+\.tmp|\.verify-.+")


class Manifest:
    """`.gpt2load-download.json`: size, mtime and sha256 of every file verified into the folder.

    A file counts as complete without reading it when its size and mtime still match; if only the mtime
    changed (a copy without -p), re-hashing against the recorded sha256 decides. Written under the folder lock.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / MANIFEST
        self.files: dict[str, dict] = (read_json(self.path) or {}).get("files", {})

    def complete(self, name: str) -> bool:
        entry, path = self.files.get(name), self.path.parent / name
        if not entry or not path.is_file():
            return False
        st = path.stat()
        if st.st_size != entry.get("size"):
            return False
        if st.st_mtime_ns != entry.get("mtime_ns"):
            if digests(path)[0] != entry.get("sha256"):
                return False
            self.files[name] = {**entry, "mtime_ns": st.st_mtime_ns}
            self._save()
        return True

    def add(self, name: str, sha256: str, etag: str | None, checked: str) -> None:
        """Record `name` as verified; `checked` says how (kept in the manifest for people to read)."""
        st = (self.path.parent / name).stat()
        self.files[name] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": sha256,
            "etag": etag,
            "verified_by": checked,
        }
        self._save()

    def _save(self) -> None:
        write_json(self.path, {"files": self.files})


def digests(path: Path, git: bool = False) -> tuple[str, str | None]:
    """sha256 of the file, and its git blob sha1 if asked."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % path.stat().st_size) if git else None
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha256.update(block)
            if sha1:
                sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 else None


def sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def discard(part: Path) -> None:
    # unlink, never truncate: the .part may be a hard link into the Hugging Face cache
    part.unlink(missing_ok=True)
    sidecar(part).unlink(missing_ok=True)


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links there
        shutil.copyfile(src, dst)


def remove_stale(folder: Path) -> None:
    """Delete temp files and staging folders of our own naming (call under the lock: none is in use)."""
    for p in folder.iterdir():
        if _STALE.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive lock on the folder for the whole run, and remove the lock file at the end.

    Why one folder lock rather than per-process temp names: resuming needs one stable `.part` name per file,
    and two runs must not append to it at once. The second run waits, then finds the files complete in the
    manifest and transfers nothing. The kernel drops a flock when its process dies, even by kill -9, so a
    dead run never blocks the next. The holder removes the file before releasing it; a waiter that then gets
    the lock of a removed file notices (the path no longer names its inode) and locks the path afresh.
    """
    path = folder / LOCK
    waited = False
    while True:
        fh = open(path, "a+b")
        try:
            if not _try_lock(fh, blocking=False):
                if not waited:
                    on_wait()
                    waited = True
                _try_lock(fh, blocking=True)
            if fcntl is None or _names(path, fh):
                break
        except BaseException:
            fh.close()
            raise
        fh.close()
    try:
        yield
    finally:
        if fcntl is not None:  # Windows cannot remove an open file; there it stays, harmless
            path.unlink(missing_ok=True)
        fh.close()  # releases the lock


def _names(path: Path, fh) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


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
