"""The `Source` base class: a model on disk in one layout, opened once. Its own module so that the readers of
the layouts `layouts.open_source` dispatches to lazily (GGUF, llm.c, nanoGPT) can subclass it without a cycle."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch

from ..model.config import GPTConfig


class Source(ABC):
    """A model on disk in one layout: its architecture (`cfg`, read when it was opened) and answers about the
    rest, each from the files the source opened once."""

    kind: str  # the layout's name: "openai", "hf", "own" or "pth" (info's `layout`, the cache's `source_kind`)
    cacheable = False  # worth converting once into gpt2load's cache folder (its names and shapes need mapping)

    def __init__(self, path: Path, cfg: GPTConfig, folder: Path) -> None:
        self.path = path  # the weights file (or checkpoint prefix)
        self.cfg = cfg
        self.folder = folder

    @abstractmethod
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's tensors in GPTModel names, one at a time, with coverage and shape checks."""

    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The floating dtype the weights are stored in (that of the largest tensor), from headers if it can."""

    def head(self) -> dict | None:
        """The head the files record, as `GPTModel.head_meta()` describes it; None when they record none (a
        tied head, or one the tensors decide)."""
        return None

    def tied(self) -> bool | None:
        """Whether the recorded head is tied (None: not recorded, the tensors decide)."""
        head = self.head()
        return None if head is None else bool(head.get("tied", True))

    def untied_head(self) -> dict | None:
        """The untied head load_gpt2 gives this model (as `head()` describes it), None when it ties it: what the
        files record, else what the stored tensors say (as model_from_tensors decides)."""
        head = self.head()
        if head is not None:
            return None if head.get("tied", True) else head
        state = self._model_state()
        return None if state is None else _data_head(state)

    def _model_state(self) -> dict[str, torch.Tensor] | None:
        """The stored tensors when they already carry GPTModel names (own form, book .pth), else None."""
        return None

    def metadata(self) -> dict[str, str]:
        """The header metadata of gpt2load's own file ({} for other layouts)."""
        return {}

    def quantization(self) -> str | None:
        """The quantization the file records ("int8"), or None for float weights."""
        return None

    def adapters(self) -> Path | None:
        """The unmerged LoRA adapters file the model was saved with (fine-tuning's --no-merge), if any."""
        return None

    def inputs(self) -> list[Path]:
        """The files conversion depends on (for the conversion cache's fingerprint)."""
        return [self.path, *self._configs()]

    def _configs(self) -> list[Path]:
        return [self.folder / n for n in ("hparams.json", "config.json") if (self.folder / n).is_file()]


def _data_head(state: dict[str, torch.Tensor]) -> dict | None:
    """The untied head of a GPTModel state_dict, None when it has none or one equal to tok_emb without a bias."""
    w, b, emb = state.get("out_head.weight"), state.get("out_head.bias"), state.get("tok_emb.weight")
    if w is None or (b is None and emb is not None and w.shape == emb.shape and torch.equal(w, emb)):
        return None
    return {"tied": False, "shape": list(w.shape), "bias": b is not None}
