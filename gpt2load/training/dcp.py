"""Sharded training checkpoints (FSDP): `torch.distributed.checkpoint` folders `step-NNNNNN.dcp`, each rank
writing its own shard of the weights and optimizer state.

A folder is written under a temporary name and renamed by rank 0 once every rank has finished, with `meta.pt`
(step, schedule, data position, every rank's RNG states, settings, the model's shapes) and a sha256 manifest of
every file, so a killed run leaves only a temporary folder (removed when the next run starts) and a damaged
folder is recognised. DCP reshards on load, so a run resumes on any number of processes, or in one process
without FSDP.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import Gpt2LoadError
from ..fsutil import sha256_file
from .distributed import barrier, broadcast, dist_info

SUFFIX = ".dcp"
META = "meta.pt"
MANIFEST = "manifest.sha256"


def model_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every state_dict entry's full shape (a DTensor shard reports the whole tensor's)."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_sharded(final: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Every rank: write this rank's shards of the model and optimizer into the folder `final` (rank 0 adds
    `meta`, the manifest, and renames the folder into place)."""
    import torch.distributed.checkpoint as dcp

    rank, _ = dist_info()
    # one temporary name for all ranks, in fsutil's pattern, so a killed run's folder is cleaned up as stale
    tmp = final.with_name(broadcast(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
    dcp.save(_states(model, optimizer), checkpoint_id=tmp)
    if rank == 0:
        _fsync_write(tmp / META, lambda f: torch.save(meta, f))
        lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(tmp.iterdir())]
        _fsync_write(tmp / MANIFEST, lambda f: f.write("".join(lines).encode()))
        if final.exists():  # written again after a resume from an earlier step
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()


def read_meta(folder: Path) -> dict:
    """`meta.pt` of a sharded checkpoint, after checking every file against the manifest; ValueError when
    damaged or incomplete."""
    try:
        lines = (folder / MANIFEST).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"it has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError):
        raise ValueError(f"its {MANIFEST} is unreadable") from None
    listed = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        listed[name] = digest
    if META not in listed or ".metadata" not in listed:
        raise ValueError("it is incomplete")
    for name, digest in listed.items():
        try:
            ok = sha256_file(folder / name) == digest
        except OSError:
            ok = False
        if not ok:
            raise ValueError(f"{name} is missing, truncated or corrupt")
    try:
        meta = torch.load(folder / META, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"{META} is unreadable: {type(e).__name__}") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{META} is not a gpt2load checkpoint's")
    return meta


def check_fits(folder: Path, meta: dict, model: nn.Module, trainable: list[str], train_layers) -> None:
    """One clear line when the checkpoint was written for another model or other trained parameters."""
    shapes = model_shapes(model)
    if meta.get("shapes") != shapes:
        was = meta.get("shapes") or {}
        differ = sorted(k for k in set(was) | set(shapes) if was.get(k) != shapes.get(k))
        raise Gpt2LoadError(
            f"{folder} holds a model of another configuration (it differs in {differ[:3]}): resume with the same "
            "--model and LoRA/head settings, or use another --out"
        )
    if meta.get("trainable") != trainable:
        raise Gpt2LoadError(
            f"{folder} was trained with other --train-layers than {train_layers!r}: resume with the same value"
        )


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank: read the model and optimizer state back, resharded to this run's processes (or unsharded
    for a single process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    states = _states(model, optimizer)
    with warnings.catch_warnings():  # in one process DCP warns that it assumes one process
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(states, checkpoint_id=folder, no_dist=dist_info()[1] == 1)
    set_model_state_dict(model, states["model"])
    set_optimizer_state_dict(model, optimizer, states["optim"])


__all__ = ["META", "SUFFIX", "check_fits", "load_sharded", "model_shapes", "read_meta", "save_sharded"]
