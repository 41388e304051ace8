"""Measured kernel choices kept per machine, so that only a machine's first process pays for measuring them.

`Kernels` (registry.py) measures which kernel is fastest per shape bucket; a `KernelStore` keeps those choices in
$XDG_CACHE_HOME/gpt2load/kernels (an absolute one; else ~/.cache/...), one JSON file per machine and settings,
named by a hash of everything a choice depends on beyond its own key: the CPU (model name and flags, as the C
library's name has it), torch's version, the C library's build identity (or that it is off or unavailable) and
the `KernelSettings`. Inside, each measured key (kernel candidates, dtype, rows bucket, shape, thread count),
as JSON text, names the kernel chosen (kernels are stored by name, `NAMES`).

Read once per `Kernels`, at its first measurement; written when the process exits (the Kernels' finalizer) or
by `Kernels.save()`, through a synced temporary file renamed into place, merged with what another process wrote
meanwhile (the last writer wins a key both measured). A file that is malformed, truncated, too large, written
for another key or naming an unknown kernel is ignored (or that entry is), never an error: it is measured
again. A folder that is a symlink or another user's is not used, as for the C library.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..fsutil import atomic_path
from ..settings import KernelSettings, Settings
from . import attn, int8mm, native, native_build
from .kernels import KERNELS

FORMAT = 1
MAX_ENTRIES = 2048  # kept per file (the newest); shapes are bucketed, so a model needs a few dozen
_MAX_BYTES = 1 << 20  # a larger file is not one of ours

NAMES: dict[str, Callable] = {
    **KERNELS,
    "int8pack": int8mm.int8pack,
    "int8native": int8mm.int8native,
    "exact": int8mm.exact,
    "sdpa": attn.sdpa,
    "attend": attn._attend,
    "attend_one": attn._attend_one,
}
_NAME_OF = {fn: name for name, fn in NAMES.items()}


def entry_key(key: tuple) -> str | None:
    """A measured key as text (kernels by name, dtypes and sizes as JSON); None when it holds a kernel without a
    name (it is then measured in every process)."""

    def plain(v):
        if isinstance(v, (tuple, list)):  # (torch.Size too)
            return [plain(i) for i in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (torch.dtype, torch.device)):
            return str(v)
        if callable(v) and v in _NAME_OF:
            return "@" + _NAME_OF[v]
        raise KeyError(v)

    try:
        return json.dumps(plain(key), separators=(",", ":"))
    except (KeyError, TypeError):
        return None


@dataclass(frozen=True)
class KernelStore:
    """A folder of measured kernel choices. cc: the CC setting (which compiler built the C library: part of its
    identity). Build one with `machine_store(settings)`, or in a folder of your own (tests)."""

    folder: Path
    cc: str = ""

    def machine_key(self, settings: KernelSettings) -> str:
        """The hash naming the file for these settings on this machine, with this torch and C library."""
        if settings.native == "0":
            library = "off"
        elif not native.available():
            library = "unavailable"
        else:
            try:
                library = native_build.build_identity(self.cc)
            except native_build.Unusable:
                library = "unavailable"
        parts = [f"format {FORMAT}", native_build.cpu_identity(), torch.__version__, library]
        parts.append(json.dumps(asdict(settings), sort_keys=True))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def read(self, key: str) -> dict[str, str]:
        """The entries stored under `key` whose kernel has a name here; {} when there is no usable file."""
        try:
            if _own_folder(self.folder, create=False) is not None:
                return {}
            fd = os.open(self.folder / f"{key[:32]}.json", os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > _MAX_BYTES:
                    return {}
                data = json.loads(f.read(_MAX_BYTES + 1))
        except (OSError, ValueError):  # absent, unreadable, a symlink, cut short, not JSON
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str) and v in NAMES}

    def write(self, key: str, entries: dict[str, str]) -> bool:
        """Replace the file for `key` by `entries` (the newest MAX_ENTRIES); whether it was written."""
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
        text = json.dumps({"format": FORMAT, "key": key, "entries": entries}, indent=0)
        try:
            if _own_folder(self.folder, create=True) is not None:
                return False
            with atomic_path(self.folder / f"{key[:32]}.json") as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
            native_build._fsync(self.folder, folder=True)
        except OSError:  # a read-only or full disk: the choices are measured again next time
            return False
        return True


def _own_folder(folder: Path, create: bool) -> str | None:
    """None when `folder` is ours and private (see native_build), else why not; not made when reading."""
    if not create and not os.path.lexists(folder):
        return "absent"
    return native_build._own_folder(folder)


def machine_store(settings: Settings) -> KernelStore | None:
    """The machine's store, in gpt2load's cache folder; None when GPT2LOAD_KERNEL_CACHE=0 or there is no home."""
    if not settings.kernel_store:
        return None
    try:
        return KernelStore(settings.cache_home() / "gpt2load" / "kernels", settings.cc)
    except (RuntimeError, KeyError):  # no home folder to be found
        return None


class StoredChoices:
    """One `Kernels`' view of its store: the entries for its settings, read at first use, and what it measured
    since (written back by `save`)."""

    def __init__(self, store: KernelStore, settings: KernelSettings) -> None:
        self.store, self.settings = store, settings
        self._key: str | None = None
        self._entries: dict[str, str] | None = None
        self._new: dict[str, str | None] = {}  # measured here (None: dropped) since the last save

    def _loaded(self) -> dict[str, str]:
        if self._entries is None:
            self._key = self.store.machine_key(self.settings)
            self._entries = self.store.read(self._key)
        return self._entries

    def get(self, key: tuple) -> Callable | None:
        """The kernel stored for this measured key, or None."""
        text = entry_key(key)
        name = None if text is None else self._loaded().get(text)
        return None if name is None else NAMES[name]

    def put(self, key: tuple, kernel: Callable | None) -> None:
        """Remember `kernel` for this key (None: forget the stored one)."""
        text = entry_key(key)
        if text is not None and (kernel is None or kernel in _NAME_OF):
            entries = self._loaded()
            if kernel is None:
                entries.pop(text, None)
            else:
                entries[text] = _NAME_OF[kernel]
            self._new[text] = entries.get(text)

    def save(self) -> None:
        """Write what was measured since the last save, over what the file holds now (another process may have
        written it meanwhile)."""
        new = dict(self._new)  # (a copy: at exit, a serving thread may still be measuring)
        if not new or self._key is None:
            return
        entries = self.store.read(self._key)
        for text, name in new.items():
            entries.pop(text, None)  # (re-inserted last: the newest are kept under the cap)
            if name is not None:
                entries[text] = name
        if self.store.write(self._key, entries):
            for text, name in new.items():
                if self._new.get(text, name) == name:
                    self._new.pop(text, None)


__all__ = ["KernelStore", "StoredChoices", "machine_store", "NAMES"]
