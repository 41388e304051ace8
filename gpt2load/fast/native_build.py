"""Building, caching and loading gpt2load's C kernels (native.py binds and calls them).

Built with `$CC` (split as a shell word list; else `cc`) for this CPU (-march=native) into
$XDG_CACHE_HOME/gpt2load/native (an absolute one; else ~/.cache/..., else a private folder in the temporary
folder), named by a hash of the sources, the compiler and the CPU, so a shared home folder on another CPU builds
its own. Beside it, its sha256, checked before each load: a library cut short is rebuilt, never loaded. No
compiler, a failed build or GPT2LOAD_NATIVE=0: the kernels are simply not candidates (with a one-line notice
unless GPT2LOAD_NATIVE=0 or no `cc` exists and CC is unset).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import shlex
import stat
import subprocess
import tempfile
from pathlib import Path

from ..fsutil import sha256_file
from ..settings import Settings

_SOURCES = [Path(__file__).parent / "csrc" / n for n in ("gemv.c", "gemm.c", "attend.c", "block.c")]
_HEADERS = [
    Path(__file__).parent / "csrc" / n for n in ("vecmath.h", "rowdot.h")
]  # included by the sources: part of the library's name
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def cpu_identity() -> str:
    """The CPU as the library's name and the kernel store's key know it: its model name and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


class Unusable(Exception):
    """Why the kernels cannot be built or loaded here (the message); `quiet`: expected, so no notice."""

    def __init__(self, why: str, quiet: bool = False) -> None:
        super().__init__(why)
        self.quiet = quiet


def _compiler(value: str) -> list[str]:
    """$CC split as a shell splits a word list (CC="ccache gcc -O2"), or ["cc"] when unset or blank."""
    try:
        return shlex.split(value) or ["cc"]
    except ValueError as e:
        raise Unusable(f"CC={value!r} is not a command line ({e}): fix its quoting, or unset it") from None


def _private(path: Path) -> bool:
    """Whether `path` is a regular file (not a symlink) of ours that nobody else can write (it runs as our code)."""
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _own_folder(folder: Path) -> str | None:
    """Make `folder` ours and private; None, or why it cannot be used. It is opened without following a symlink
    (one planted in a shared /tmp may point at a folder of ours, which would then be chmodded), its owner read
    from that descriptor (another user's folder, e.g. made first in /tmp, runs their code), and it is tightened
    to 0700 through the descriptor if others could write to it (as under umask 002)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return f"{folder} is a symlink or not a folder"
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            return f"{folder} belongs to another user"
        if st.st_mode & 0o022:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return None


def _folders(settings: Settings) -> list[Path]:
    """$XDG_CACHE_HOME/gpt2load/native, else ~/.cache/... (a relative XDG_CACHE_HOME is ignored, as the XDG spec
    says: it would build under whatever folder the process happens to run in); then a private temporary one."""
    folders = [Path(tempfile.gettempdir()) / f"gpt2load-native-{os.getuid()}"]
    try:
        folders.insert(0, settings.cache_home() / "gpt2load" / "native")
    except (RuntimeError, KeyError):  # no home folder to be found: the temporary folder only
        pass
    return folders


def _record(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _fsync(path: Path | str, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # (some file systems cannot sync a folder: the files themselves are on disk)
            raise
    finally:
        os.close(fd)


def _verified(library: Path) -> bool:
    """Whether `library` is ours, private, and holds the bytes its record names. A library cut short (a crash
    before its data reached the disk, a full disk, a partial copy) makes dlopen die with SIGBUS: rebuilt instead."""
    record = _record(library)
    try:
        if not (_private(library) and stat.S_ISREG(os.lstat(record).st_mode)):
            return False
        with open(record, "rb") as f:
            recorded = f.read(100).decode("ascii", "replace").strip()
        return recorded == sha256_file(library)
    except OSError:
        return False


def _compile(cc: list[str], target: Path) -> str | None:
    """Compile the C sources into `target`, then write its sha256 beside it: each written to a temporary file,
    synced and renamed, so neither is ever seen half-written, and a record always follows its whole library.
    None, or the error."""
    tmps = []
    try:
        for suffix in (".so.part", ".sha256.part"):
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=suffix)
            os.close(fd)
            tmps.append(tmp)
        cmd = [*cc, *_FLAGS, "-o", tmps[0], *map(str, _SOURCES)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode} and no message"])[-1]
            return f"{shlex.join(cc)}: {last}"
        os.chmod(tmps[0], 0o755)  # whatever the umask: nobody else may write to code we run
        Path(tmps[1]).write_text(sha256_file(Path(tmps[0])) + "\n")
        for tmp in tmps:
            _fsync(tmp)
        os.replace(tmps[0], target)
        os.replace(tmps[1], _record(target))
        _fsync(target.parent, folder=True)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> None:
    """Declare the kernels' signatures; AttributeError when the library lacks one of them."""
    fn = lib.gpt2load_gemv
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 2, ctypes.c_int, *[ctypes.c_void_p] * 3]
    fn.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn = lib.gpt2load_gemm
    fn.restype = ctypes.c_int
    fn.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3, ctypes.c_int, ctypes.c_int]
    fn = lib.gpt2load_attend_one
    fn.restype = ctypes.c_int
    fn.argtypes = [*[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 4, *[ctypes.c_void_p] * 4, ctypes.c_float]
    fn.argtypes += [ctypes.c_int]
    fn = lib.gpt2load_attend
    fn.restype = ctypes.c_int
    fn.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 5, *[ctypes.c_void_p] * 3, ctypes.c_float, ctypes.c_int]
    fn = lib.gpt2load_block
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, *[ctypes.c_void_p] * 2, ctypes.c_int64, *[ctypes.c_void_p] * 3]
    fn.argtypes += [ctypes.c_int64, *[ctypes.c_void_p] * 2, ctypes.c_int]
    for name in ("gpt2load_gemm_supported", "gpt2load_attend_supported"):
        getattr(lib, name)


def build_identity(cc: str) -> str:
    """The hash of the sources, the compiler (`cc`, the CC setting, and its version), the flags and the CPU that
    names the library built from them (its first 20 digits); Unusable when there is no compiler."""
    command = _compiler(cc)
    try:
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise Unusable(f"no C compiler ({shlex.join(command)}: {e})", quiet=not cc) from None
    sources = [f.read_text() for f in _SOURCES + _HEADERS]
    return hashlib.sha256("\0".join([*sources, version, cpu_identity(), *_FLAGS, *command]).encode()).hexdigest()


def load_library(settings: Settings) -> ctypes.CDLL:
    """The library, found verified in the first usable folder or built there (the compiler and the cache folder
    from `settings`); Unusable with why not."""
    cc = _compiler(settings.cc)
    name = f"kernels-{build_identity(settings.cc)[:20]}.so"
    why = None
    for folder in _folders(settings):
        target = folder / name
        try:
            why = _own_folder(folder)
            if why is not None:
                continue
            if not _verified(target):  # absent, cut short, unrecorded or writable by others: built afresh
                why = _compile(cc, target)
                if why is not None:
                    continue
                if not _verified(target):
                    why = f"{target} changed while it was built"
                    continue
            lib = ctypes.CDLL(str(target))
        except OSError as e:  # a folder we cannot write to, or a file we cannot load: try the next
            why = str(e)
            continue
        try:
            _bind(lib)
        except AttributeError as e:  # not our library after all: the next run rebuilds it, this one tries on
            why = f"{target} lacks a kernel ({e})"
            for path in (target, _record(target)):
                path.unlink(missing_ok=True)
            continue
        return lib
    raise Unusable(f"building {', '.join(f.name for f in _SOURCES)} failed: {why}")
