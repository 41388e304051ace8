"""A weights file opened once: a safetensors file (its header parsed once, its tensors mapped once) or a torch.save
state_dict (loaded once), and the dtype its weights are stored in."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from . import stfile

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ST_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def largest_float(sizes: Iterable[tuple[int, torch.dtype | None]]) -> torch.dtype:
    """The floating dtype of the largest tensor among (bytes, dtype) pairs; float32 when none is a float."""
    floats = [(n, d) for n, d in sizes if d in FLOAT_DTYPES]
    return max(floats, key=lambda nd: nd[0])[1] if floats else torch.float32


class SafetensorsFile:
    """A safetensors file: its header parsed once, its tensors mapped once."""

    def __init__(self, path: Path, header: tuple[dict[str, dict], dict[str, str]] | None = None) -> None:
        self.path, self._header, self._tensors = path, header, None

    def header(self) -> tuple[dict[str, dict], dict[str, str]]:
        if self._header is None:
            self._header = stfile.read_header(self.path)
        return self._header

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = stfile.mmap_tensors(self.path, self.header()[0])
        return self._tensors

    def dtype(self) -> torch.dtype:
        entries = self.header()[0].values()
        return largest_float((e["data_offsets"][1] - e["data_offsets"][0], _ST_FLOATS.get(e["dtype"])) for e in entries)


class TorchFile:
    """A torch.save state_dict, loaded once."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        self.path, self._state, self._raw = path, state, state

    def raw(self) -> object:
        """What torch.load gave, loaded once: a state_dict, or a checkpoint dict holding one (nanoGPT's)."""
        if self._raw is None:
            self._raw = _torch_load(self.path)
        return self._raw

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = _state_dict(self.raw(), self.path)
        return self._state

    def dtype(self) -> torch.dtype:
        return largest_float((t.nbytes, t.dtype) for t in self.tensors().values())


def _torch_load(p: Path) -> object:
    # torch.save's zip format can be memory-mapped (zero-copy); the legacy format (torch < 1.6, many older
    # pytorch_model.bin files, `_use_new_zipfile_serialization=False`) cannot, and is read into memory.
    mmap = zipfile.is_zipfile(p)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a bad file
        raise Gpt2LoadError(
            f"{p} could not be read as a PyTorch state_dict ({type(e).__name__}): is it complete?"
        ) from None
    return state


def _state_dict(state: object, p: Path) -> dict[str, torch.Tensor]:
    """The state_dict in what torch.load gave, every entry checked to be a named tensor."""
    if isinstance(state, dict) and "model_state_dict" in state:  # the book's chapter-5 checkpoint
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise Gpt2LoadError(
            f"{p} holds a {type(state).__name__}, not a state_dict: save model.state_dict() (a dict of tensors)"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise Gpt2LoadError(
                f"{p} is not a plain state_dict: entry {key!r} holds a {type(value).__name__}, not a tensor; "
                "save model.state_dict()"
            )
    return state
