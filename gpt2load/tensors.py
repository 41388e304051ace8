"""The tensors of any model gpt2load reads, one at a time, in the layout a pipeline asks for.

"book" is GPTModel's state_dict names and shapes (tied head and masks left out), "hf" a transformers
GPT2LMHeadModel's stored tensors (Conv1D [in, out] weights, fused q/k/v, "transformer." prefix), "openai" the
names and shapes of OpenAI's TensorFlow checkpoint. Nothing builds a model; tensors keep their stored dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from .build import dtype_name
from .config import GPTConfig, resolve_size
from .convert import CONV1D, CONV1D_3D, HF, HF_PREFIX, OPENAI, NameMap, Rule, expected_shapes, from_model_layout
from .errors import Gpt2LoadError
from .hub import model_dir
from .load import Source, inspect_path, model_folder, source_dtype, source_tensors

T = TypeVar("T")
LAYOUTS: dict[str, tuple[NameMap | None, str]] = {"book": (None, ""), "hf": (HF, HF_PREFIX), "openai": (OPENAI, "")}


def _layout(layout: str) -> tuple[NameMap | None, str]:
    if layout not in LAYOUTS:
        raise Gpt2LoadError(f"unknown tensor layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def _regroup(items: Iterable[tuple[str, T]], cfg: GPTConfig, layout: str, combine) -> Iterator[tuple[str, T]]:
    """(layout name, combine(parts, rule)) for GPTModel-named items, each as soon as all its parts have arrived.

    The fused q/k/v projection needs three GPTModel tensors; they are held only until the third arrives.
    """
    name_map, prefix = _layout(layout)
    if name_map is None:
        yield from items
        return
    owner = {t: (src, rule, targets) for src, rule, targets in name_map.inverse(cfg) for t in targets}
    held: dict[str, T] = {}
    for name, item in items:
        src, rule, targets = owner[name]
        held[name] = item
        if all(x in held for x in targets):
            yield prefix + src, combine([held.pop(x) for x in targets], rule)


def to_layout(
    book: Iterable[tuple[str, torch.Tensor]], cfg: GPTConfig, layout: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """GPTModel-named tensors re-expressed in `layout`, one tensor (or one fused q/k/v) at a time."""
    return _regroup(book, cfg, layout, from_model_layout)


def iter_tensors(
    path: str | Path,
    layout: str = "book",
    source: str = "hf",
    weights_dir: str | Path | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs of a model in `layout`, reading one tensor at a time, without a model.

    Args:
        path: a local model (OpenAI checkpoint folder, Hugging Face folder, gpt2load file or folder, book .pth)
            or a size name (downloaded on first use, like load_gpt2).
        layout: "book" (GPTModel names), "hf" (transformers GPT2LMHeadModel) or "openai" (TensorFlow names).
        source, weights_dir: where a size name downloads from and to.

    Every tensor is checked (names, coverage, shapes) as it is read; dtypes are those stored.
    """
    _layout(layout)  # an unknown layout fails before anything is read
    src = inspect_path(model_folder(path, source, weights_dir, quiet=True))
    yield from to_layout(source_tensors(src), src.cfg, layout)


def _source_shape(parts: list[tuple[int, ...]], rule: Rule) -> tuple[int, ...]:
    """The shape from_model_layout gives for parts of these shapes, by arithmetic alone."""
    shape = (sum(p[0] for p in parts), *parts[0][1:])
    if rule.layout in (CONV1D, CONV1D_3D):
        shape = shape[::-1]
    return (1, *shape) if rule.layout == CONV1D_3D else shape


def layout_specs(cfg: GPTConfig, layout: str, dtype: torch.dtype = torch.float32) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype name) of every tensor of a model of `cfg` in `layout`, in the order `to_layout`
    yields them from GPTModel's order, by arithmetic on shapes (nothing allocated)."""
    name = dtype_name(dtype)
    specs = _regroup(expected_shapes(cfg).items(), cfg, layout, _source_shape)
    return [(k, tuple(s), name) for k, s in specs]


def tensor_table(
    model: str | Path, layout: str = "book", source: str = "hf", weights_dir: str | Path | None = None
) -> list[dict]:
    """Name, shape, dtype and size in bytes of every tensor of `model` in `layout`, read from its headers
    (a size name that is not downloaded is described from its preset, as float32)."""
    _layout(layout)
    if os.path.exists(model) or os.path.exists(f"{model}.index"):
        src: Source | None = inspect_path(model)
    else:
        folder = model_dir(resolve_size(str(model)), source, weights_dir)
        src = inspect_path(folder) if folder.is_dir() else None
    if src is not None:
        cfg, dtype = src.cfg, source_dtype(src)
    else:
        cfg, dtype = GPTConfig.from_name(str(model)), torch.float32
    return [
        {"name": n, "shape": list(s), "dtype": d, "bytes": torch.Size(s).numel() * dtype.itemsize}
        for n, s, d in layout_specs(cfg, layout, dtype)
    ]
