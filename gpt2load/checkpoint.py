"""Training checkpoints: atomic writes with a sha256 sidecar, newest-valid lookup with fallback past damaged
files, pruning, and every RNG state needed for a bit-exact resume."""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .stfile import atomic_path

CHECKPOINT_FORMAT = "gpt2load-train"
CHECKPOINT_VERSION = 1
_CKPT_NAME = re.compile(r"^step-(\d+)\.pt$")


class _HashingWriter:
    """A file wrapper that hashes what torch.save writes, so the sidecar costs no second read."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha.update(block)
    return sha.hexdigest()


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in `folder`, oldest first (temporary files ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save `payload` atomically, with a sha256sum-style sidecar `<name>.sha256` written first."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            torch.save(payload, w)
            f.flush()
            os.fsync(f.fileno())
        sidecar = path.with_name(path.name + ".sha256")
        with atomic_path(sidecar) as tmp_side:
            tmp_side.write_text(f"{w.sha.hexdigest()}  {path.name}\n", encoding="utf-8")
    # The sidecar lands before the checkpoint: a checkpoint on disk always has one.


def _read_checkpoint(path: Path, device: torch.device) -> dict:
    sidecar = path.with_name(path.name + ".sha256")
    try:
        want = sidecar.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        raise ValueError("its .sha256 file is missing") from None
    if _sha256_file(path) != want:
        raise ValueError("sha256 mismatch: truncated or corrupt")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"unreadable: {type(e).__name__}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a gpt2load training checkpoint")
    return ck


def latest_checkpoint(folder: Path, device: torch.device, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies and loads; damaged newer ones are renamed `*.corrupt` with a
    warning each. None when there is no usable checkpoint."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, _read_checkpoint(path, device)
        except ValueError as e:
            bad = path.with_name(path.name + ".corrupt")
            os.replace(path, bad)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            warn(f"checkpoint {path} is damaged ({e}); moved it to {bad.name} and trying the previous one")
    return None


def prune(folder: Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def rng_state(epoch_rng: torch.Tensor | None) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "epoch_rng": epoch_rng,  # the torch RNG just before this epoch's loader was opened
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
