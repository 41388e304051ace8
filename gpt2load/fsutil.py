"""Writing files safely: atomic writes that respect the umask, what gpt2load may replace, run locks, and the
cleanup of temporary files left by a killed process.

Rule: gpt2load writes into a new path, or replaces only what it can prove it wrote before. Every output it
writes carries a marker (a hidden JSON file inside an output folder, or beside an output file) listing the
files and their sizes and modification times; an existing `--out` is replaced only when it still matches its
marker exactly, and only when the caller asks for it (`--force`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import Gpt2LoadError

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MARKER = ".gpt2load-output.json"  # inside an output folder
LOCK_NAME = ".gpt2load.lock"
_LEGACY_AGE_S = 3600  # temp files without a pid are removed once they are this old (their writer is gone)


def _tmp_pattern(name: str | None) -> re.Pattern:
    """Temporary names: `.{final}.{pid}.{random}[.png].tmp` (this version), `.{final}.{random}[.png].tmp`
    (older versions, no pid) and `.{final}.old-{pid}` (an output being replaced)."""
    n = re.escape(name) if name is not None else ".+?"
    return re.compile(rf"^\.(?P<name>{n})\.(?:(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]{{6,}}(?:\.png)?\.tmp|old-(?P<old>\d+))$")


# ---------------------------------------------------------------- temporary names and their cleanup


def _tmp_name(final: Path, suffix: str = "") -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_stale_temps(folder: Path, name: str | None = None, *, all_ours: bool = False) -> list[Path]:
    """Remove temporary files/folders of gpt2load's naming in `folder` whose writer is gone (dead pid, or an
    old-style name older than an hour); `name` limits it to temps of that final name. `all_ours` removes
    every one (the caller holds the folder's lock, so no other writer can be at work). Returns what went."""
    removed, pattern = [], _tmp_pattern(name)
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m:
            continue
        pid = m.group("pid") or m.group("old")
        try:
            st = p.lstat()
        except OSError:
            continue
        if not all_ours and (_alive(int(pid)) if pid else time.time() - st.st_mtime < _LEGACY_AGE_S):
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _renamed(e: OSError, final: Path, tmp: Path | None = None) -> OSError:
    """The same error naming the user's path rather than the hidden temporary one (when it named `tmp`, or
    always when `tmp` is None)."""
    if tmp is not None and not str(e.filename or "").startswith(str(tmp)):
        return e
    return OSError(e.errno, e.strerror or str(e), str(final))


@contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `final`, renamed onto it only if the block finishes without an error.

    The temp file is created with mode 0666 so the process umask applies, as for any new file (no umask
    flipping). Stale temps of the same name from a killed run are removed first. Errors name `final`."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final.parent, final.name)
        tmp = _tmp_name(final, suffix)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o666))
    except OSError as e:
        raise _renamed(e, final) from None
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as e:
        raise _renamed(e, final, tmp) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path, fmt: str, *, force: bool = False, protect: Sequence[Path] = ()) -> Iterator[Path]:
    """A temporary folder beside `final` that becomes `final` when the block completes, with a marker listing
    what was written. `final` must be new, an empty folder, or (with `force`) an earlier gpt2load output of
    format `fmt` (see `check_output`); the old output's own files are removed, nothing else."""
    final = Path(final)
    check_output(final, fmt, folder=True, force=force, protect=protect)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final.parent, final.name)
        tmp = _tmp_name(final)
        tmp.mkdir(0o777)  # the umask applies, as for any new folder
    except OSError as e:
        raise _renamed(e, final) from None
    try:
        yield tmp
        write_marker(tmp, fmt)
        if final.is_dir() and any(final.iterdir()):
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            check_output(final, fmt, folder=True, force=force, protect=protect)  # still ours, just before
            os.replace(final, old)
            os.replace(tmp, final)
            _remove_output(old)
        else:
            os.replace(tmp, final)  # rename(2) replaces an empty folder atomically
    except OSError as e:
        raise _renamed(e, final, tmp) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output_file(final: Path, fmt: str, *, force: bool = False, protect: Sequence[Path] = ()):
    """`atomic_path` for a user-named output file: checked with `check_output` first, and a marker beside it
    (`.NAME.gpt2load.json`) records what was written, so a later run may replace it with `force`."""
    final = Path(final)
    check_output(final, fmt, folder=False, force=force, protect=protect)
    with atomic_path(final) as tmp:
        yield tmp
    mark_file(final, fmt)


# ---------------------------------------------------------------- what gpt2load owns


def file_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.gpt2load.json")


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def mark_file(path: Path, fmt: str) -> None:
    """Record the file at `path` (size, mtime) as gpt2load's output of format `fmt`, in a hidden file beside it."""
    obj = {"written_by": "gpt2load", "format": fmt, "files": {path.name: _stamp(path)}}
    with atomic_path(file_marker(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def write_marker(folder: Path, fmt: str) -> None:
    """Record every file under `folder` (size, mtime) as gpt2load's output of format `fmt`."""
    files = {str(p.relative_to(folder)): _stamp(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MARKER).write_text(
        json.dumps({"written_by": "gpt2load", "format": fmt, "files": files}, indent=1) + "\n", encoding="utf-8"
    )


def _read_marker(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and m.get("written_by") == "gpt2load" and isinstance(m.get("files"), dict)
    return m if ok else None


def owned_format(path: Path) -> str | None:
    """The format of the gpt2load output at `path` if it is exactly what gpt2load wrote there, else None."""
    if path.is_dir() and not path.is_symlink():
        m = _read_marker(path / MARKER)
        if m is None:
            return None
        present = {str(p.relative_to(path)) for p in path.rglob("*") if p.name != MARKER and not p.is_dir()}
        if present != set(m["files"]) or any(p.is_symlink() for p in path.rglob("*")):
            return None
        files = m["files"].items()
    else:
        m = _read_marker(file_marker(path))
        if m is None or set(m["files"]) != {path.name}:
            return None
        files = [(path.name, m["files"][path.name])]
    base = path if path.is_dir() else path.parent
    try:
        same = all(_stamp(base / name) == list(st) for name, st in files)
    except OSError:
        return None
    return m.get("format") if same else None


def _remove_output(folder: Path) -> None:
    """Delete a set-aside earlier output: only the files its marker lists, then the folders if left empty."""
    m = _read_marker(folder / MARKER) or {"files": {}}
    for name in m["files"]:
        (folder / name).unlink(missing_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass  # something appeared that gpt2load did not write: left where it is


def check_output(
    path: str | Path, fmt: str, *, folder: bool, force: bool = False, protect: Sequence[Path] = ()
) -> bool:
    """Refuse an output path gpt2load may not write; True when it exists and will be replaced.

    Allowed: a new path; an empty folder (for folder outputs); with `force`, an earlier gpt2load output of
    format `fmt` that still matches its marker. Refused, with one line saying why: a symlink, a device, FIFO
    or socket, the working directory, any path in `protect` (the source) or a folder holding one, a
    non-empty folder or a file gpt2load did not write, and a file where a folder goes (or the reverse).
    """
    p = Path(path)
    what = f"--out {p}"
    if p.is_symlink():
        raise Gpt2LoadError(f"{what} is a symbolic link: give the real path, or a new one")
    here = Path.cwd().resolve()
    real = p.resolve()
    if real == here:
        raise Gpt2LoadError(f"{what} is the working directory: give a new folder name, e.g. --out {fmt}-model")
    for src in protect:
        src = Path(src).resolve()
        if real == src or real in src.parents:
            raise Gpt2LoadError(f"{what} holds the model being read ({src}): give a new path")
    if not p.exists():
        return False
    mode = p.stat().st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise Gpt2LoadError(f"{what} is a device, FIFO or socket, not a file: give a new path")
    if real in here.parents:
        raise Gpt2LoadError(f"{what} holds the working directory: give a new path")
    if stat.S_ISDIR(mode) != folder:
        have, want = ("a folder", "a file") if stat.S_ISDIR(mode) else ("a file", "a folder")
        raise Gpt2LoadError(f"{what} is {have}, but {fmt} output is {want}: give a new path")
    if folder and not any(p.iterdir()):
        return True
    owner = owned_format(p)
    if owner is None:
        kind = "a folder" if folder else "a file"
        raise Gpt2LoadError(
            f"{what} is {kind} gpt2load did not write (or that changed since): gpt2load replaces only its own"
            " earlier output, so give a new path"
        )
    if owner != fmt:
        raise Gpt2LoadError(f"{what} holds gpt2load's {owner} output, not {fmt}: give a new path")
    if not force:
        raise Gpt2LoadError(f"{what} holds an earlier gpt2load {fmt} output: pass --force to replace it")
    return True


# ---------------------------------------------------------------- one process per run folder


class RunLock:
    """An exclusive flock on `folder/.gpt2load.lock`, held until `release` (re-entrant within a process).

    The kernel drops the lock when the process dies, however it dies, so a killed run never leaves a folder
    locked. A second process gets a one-line error."""

    _held: dict[str, list[int]] = {}  # lock path -> [fd, holders] for this process

    def __init__(self, folder: Path, what: str = "a training run") -> None:
        self.path = str(Path(folder).resolve() / LOCK_NAME)
        self._active = True
        if self.path in RunLock._held:
            RunLock._held[self.path][1] += 1
            return
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._active = False
            raise Gpt2LoadError(
                f"{folder} is in use by another gpt2load process ({what}): wait for it to end, or use another --out"
            ) from None
        RunLock._held[self.path] = [fd, 1]

    def release(self) -> None:
        if not self._active:
            return
        self._active = False
        entry = RunLock._held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[self.path]
            os.close(entry[0])  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


RUN_MARKER = ".gpt2load-run"
# What a run folder of an earlier gpt2load version held (before it carried RUN_MARKER).
_RUN_NAMES = {"metrics.jsonl", "loss.png", "checkpoints", "tokens", "final", LOCK_NAME, RUN_MARKER}


def open_run_folder(path: str | Path) -> RunLock:
    """Check, create and lock a training run folder; stale temporary files in it are removed.

    Allowed: a new path, an empty folder, or a gpt2load run folder. Refused like `check_output`: a symlink,
    device, FIFO or file, the working directory or a folder holding it, a non-empty folder of other things.
    """
    p = Path(path)
    what = f"--out {p}"
    if p.is_symlink():
        raise Gpt2LoadError(f"{what} is a symbolic link: give the real path, or a new one")
    real, here = p.resolve(), Path.cwd().resolve()
    if real == here or real in here.parents:
        raise Gpt2LoadError(f"{what} is or holds the working directory: give a new folder name, e.g. --out run1")
    if p.exists() and not p.is_dir():
        raise Gpt2LoadError(f"{what} is not a folder: give a new folder name for the run")
    if p.is_dir():
        names = {e.name for e in p.iterdir()}
        legacy = bool(names & {"metrics.jsonl", "checkpoints"}) and names <= _RUN_NAMES
        if names and RUN_MARKER not in names and not legacy:
            raise Gpt2LoadError(
                f"{what} is a folder that is not a gpt2load training run ({len(names)} entries): give a new folder"
            )
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _renamed(e, p) from None
    lock = RunLock(p)
    (p / RUN_MARKER).touch()
    for folder in (p, p / "checkpoints"):
        clean_stale_temps(folder, all_ours=True)  # ours alone: the lock keeps other writers out
    return lock


def sha256_file(path: str | Path) -> str:
    """The file's sha256 (hex), read in 16 MB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha.update(block)
    return sha.hexdigest()


__all__ = [
    "sha256_file",
    "RunLock",
    "atomic_dir",
    "atomic_output_file",
    "atomic_path",
    "check_output",
    "clean_stale_temps",
    "mark_file",
    "open_run_folder",
    "owned_format",
    "write_marker",
]
