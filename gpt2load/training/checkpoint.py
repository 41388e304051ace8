"""Training checkpoints: atomic writes with a sha256 sidecar, newest-valid lookup with fallback past damaged
files (and past damaged sharded folders, see dcp.py), pruning, and every RNG state needed for a bit-exact resume.

A checkpoint whose sidecar is missing (copied without it, or written by a tool that does not make one) is
"unverified", not damaged: it is used when it loads with weights_only=True and holds every expected entry.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import Gpt2LoadError
from ..fsutil import atomic_path, sha256_file
from ..model.gpt import GPTModel, is_derived
from .dcp import META, read_meta
from .distributed import broadcast, dist_info, rank0_first

CHECKPOINT_FORMAT = "gpt2load-train"
CHECKPOINT_VERSION = 1
_CKPT_NAME = re.compile(r"^step-(\d+)\.(pt|dcp)$")  # .dcp: a sharded checkpoint's folder (FSDP)
EXPECTED_KEYS = frozenset(
    ("format", "version", "step", "tokens_seen", "model", "config", "optimizer", "scheduler", "data", "rng", "settings")
)


class _HashingWriter:
    """A file wrapper that hashes what torch.save writes, so the sidecar costs no second read."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files (and sharded folders) in `folder`, oldest first (temporary files
    ignored)."""
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


def _read_checkpoint(path: Path, device: torch.device) -> tuple[dict, bool]:
    """(checkpoint, verified): verified against its sidecar when there is one; ValueError when damaged."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        want = sidecar.read_text(encoding="utf-8").split()[0]
    except FileNotFoundError:
        want = None
    except (OSError, IndexError, UnicodeDecodeError):
        raise ValueError("its .sha256 file is unreadable") from None
    if want is not None and sha256_file(path) != want:
        raise ValueError("sha256 mismatch: truncated or corrupt")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"unreadable: {type(e).__name__}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a gpt2load training checkpoint")
    missing = sorted(EXPECTED_KEYS - ck.keys())
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    return ck, want is not None


def latest_checkpoint(folder: Path, device: torch.device, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies (or, without a sidecar, loads with every expected entry, with a
    warning that it is unverified); damaged newer ones are renamed `*.corrupt` with a warning each. None when
    there is no usable checkpoint."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            ck, verified = (read_meta(path), True) if path.is_dir() else _read_checkpoint(path, device)
        except ValueError as e:
            bad = path.with_name(path.name + ".corrupt")
            if bad.is_dir():
                shutil.rmtree(bad)
            os.replace(path, bad)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            warn(f"checkpoint {path} is damaged ({e}); moved it to {bad.name} and trying the previous one")
            continue
        if not verified:
            warn(f"checkpoint {path} has no .sha256 file, so it is unverified; it loads and is complete, so using it")
        return path, ck
    return None


def find_resume_checkpoint(folder: Path, device: torch.device, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """Rank 0 picks the newest usable checkpoint (setting damaged ones aside); every rank loads that one."""
    rank, world = dist_info()
    found = rank0_first(lambda: latest_checkpoint(folder, device, warn) if rank == 0 else None)
    chosen = broadcast(str(found[0]) if found else None)
    if rank != 0 and chosen is not None:
        path = Path(chosen)
        if path.is_dir():  # a sharded checkpoint: rank 0 verified it, the others need its meta.pt only
            found = (path, torch.load(path / META, map_location="cpu", weights_only=True))
        else:
            found = (path, torch.load(path, map_location=device, weights_only=True))
    return found


def restore(
    path: Path, ck: dict, model: GPTModel, optimizer: torch.optim.Optimizer, schedule, train_layers: str
) -> None:
    """Put a checkpoint's weights, optimizer and schedule state back (in place: a tied head stays tied)."""
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    missing = [k for k in missing if not is_derived(k, model)]
    if missing or unexpected:
        raise Gpt2LoadError(f"{path} does not fit this model (it differs in {(missing + unexpected)[:3]})")
    try:
        optimizer.load_state_dict(ck["optimizer"])
    except ValueError:
        raise Gpt2LoadError(
            f"{path} was trained with other --train-layers than {train_layers!r}: resume with the same value"
        ) from None
    schedule.load_state_dict(ck["scheduler"])


def prune(folder: Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[:-keep]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            continue
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
