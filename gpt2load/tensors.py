"""The tensors of the model `load_gpt2` would build, one at a time, in the layout a pipeline asks for, without
building it: `iter_tensors`, and `tensor_table` (names, shapes, dtypes, bytes from headers alone).

What load_gpt2 would build: an untied or classifier head as the files hold it, LoRA adapters saved unmerged
(fine-tuning's --no-merge) merged into their weights (or listed beside the base weights), an int8 file as its
int8 matrices and float32 scales. The layouts themselves are `gpt2load.formats.relayout`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import Gpt2LoadError
from .formats.layouts import Source, open_source
from .formats.names import expected_shapes, from_model_layout
from .formats.ownform import head_shapes
from .formats.relayout import (
    ADAPTER_MODES,
    Spec,
    check_layout,
    head_names,
    layout_specs,
    regroup,
    specs_in_layout,
)
from .hub.fetch import hf_repo, model_dir
from .load import model_folder, quantized_layout
from .model.build import dtype_name
from .model.config import PRESETS, GPTConfig
from .model.lora import read_adapters


@dataclass
class _View:
    """What load_gpt2 would build from a source, known from headers (and the head's values, for a file that
    does not record whether its head is tied)."""

    src: Source
    head: dict | None  # an untied head as head_meta gives it; None when tied
    int8: dict[str, tuple] | None  # an int8 file's {name: (shape, dtype)}, in model order
    adapters: Path | None  # the LoRA adapters file of a model saved unmerged


def _view(src: Source, layout: str, adapters: str) -> _View:
    """The view of `src`, every refusal (layout, head, int8, adapters) made before a tensor is read."""
    check_layout(layout)
    if adapters not in ADAPTER_MODES:
        raise Gpt2LoadError(f"unknown adapters mode {adapters!r}: use one of {', '.join(ADAPTER_MODES)}")
    kind = src.quantization()
    if kind is not None:  # only gpt2load's own form records one
        head, int8 = quantized_layout(src, kind)  # type: ignore[arg-type]
        if layout != "book":
            raise Gpt2LoadError(
                f"{src.path} holds {kind} weights, which only layout book names (as qweight + weight_scale): use "
                f"layout book, or convert it with --dequantize first"
            )
        return _View(src, None if head.get("tied", True) else head, int8, None)
    view = _View(src, src.untied_head(), None, src.adapters())
    head_names(src.cfg, layout, view.head)
    if view.adapters is not None and adapters == "list" and layout != "book":
        raise Gpt2LoadError(
            f"{src.path} comes with LoRA adapters ({view.adapters.name}), which only layout book names: use layout "
            "book to list them, or adapters merge"
        )
    return view


def _adapter_tensors(view: _View) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """(alpha, {weight name: (A, B)}, {adapter tensor name: tensor}) of the view's adapters, checked against
    the model's Linears as load_adapters checks them."""
    assert view.adapters is not None
    rank, alpha, targets, tensors = read_adapters(view.adapters)
    shapes = {**expected_shapes(view.src.cfg), **head_shapes(view.src.cfg, view.head)}
    pairs = {}
    want: dict[str, tuple[int, ...]] = {}
    for t in targets:
        out_in = shapes.get(f"{t}.weight", ())
        if len(out_in) != 2:
            raise Gpt2LoadError(f"{view.adapters} does not fit this model: it has no Linear {t} for an adapter")
        want.update({f"{t}.lora.A": (out_in[1], rank), f"{t}.lora.B": (rank, out_in[0])})
        pairs[f"{t}.weight"] = (tensors.get(f"{t}.lora.A"), tensors.get(f"{t}.lora.B"))
    if want.keys() != tensors.keys() or any(tuple(tensors[k].shape) != s for k, s in want.items()):
        raise Gpt2LoadError(f"{view.adapters} does not fit this model: its adapters are for other modules or sizes")
    return alpha, pairs, {k: tensors[k] for k in want}


def _book_tensors(view: _View, adapters: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The view's tensors in GPTModel names, one at a time."""
    src = view.src
    if view.int8 is not None:
        state = src.stored()  # type: ignore[attr-defined]  # an int8 file is gpt2load's own (an OwnSource)
        yield from ((name, state[name]) for name in view.int8)
        return
    items = src.tensors()
    if view.head is None:  # a head equal to the embedding: load_gpt2 ties it, so it is not a tensor of its own
        items = ((k, v) for k, v in items if not k.startswith("out_head."))
    if view.adapters is None:
        yield from items
        return
    alpha, pairs, listed = _adapter_tensors(view)
    for name, t in items:
        if adapters == "merge" and name in pairs:
            a, b = (x.to(t.dtype) for x in pairs[name])
            t = t + alpha * (a @ b).T  # what LinearWithLoRA.merged adds, in the model's dtype
        yield name, t
    if adapters == "list":
        yield from listed.items()


def _book_specs(view: _View, adapters: str, dtype: torch.dtype) -> list[Spec]:
    """(name, shape, dtype name) of every tensor `_book_tensors` yields, from headers alone."""
    cfg = view.src.cfg
    if view.int8 is not None:
        return [(k, tuple(s), dtype_name(d)) for k, (s, d) in view.int8.items()]
    shapes = {**expected_shapes(cfg), **head_shapes(cfg, view.head)}
    specs = [(k, s, dtype_name(dtype)) for k, s in shapes.items()]
    if view.adapters is not None and adapters == "list":
        specs += [(k, tuple(t.shape), dtype_name(t.dtype)) for k, t in _adapter_tensors(view)[2].items()]
    return specs


def iter_tensors(
    path: str | Path,
    layout: str = "book",
    source: str = "hf",
    weights_dir: str | Path | None = None,
    adapters: str = "merge",
    *,
    n_heads: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs of the model `load_gpt2(path)` would build, in `layout`, one tensor at a time,
    without building it.

    Args:
        path: a local model (OpenAI checkpoint folder, Hugging Face folder, gpt2load file or folder, book .pth)
            or a size name (downloaded on first use, like load_gpt2).
        layout: "book" (GPTModel names), "hf" (transformers) or "openai" (TensorFlow names). An untied head is
            named as `head_names` says (hf: lm_head.weight, or score.weight for a classifier); a head a layout
            has no name for, and int8 weights outside book, are one clear Gpt2LoadError before anything is read.
        source, weights_dir: where a size name downloads from and to.
        adapters: for a model saved with unmerged LoRA adapters, "merge" (default: the weights load_gpt2's
            merge_lora gives) or "list" (the base weights, then the adapters' `<module>.lora.A`/`.lora.B`;
            layout book only).
        n_heads: as for load_gpt2 (a book-layout .pth of a width no GPT-2 size has).

    Every tensor is checked (names, coverage, shapes) as it is read; dtypes are those stored (an int8 file
    yields its int8 `qweight`s and float32 `weight_scale`s).
    """
    view = _view(open_source(model_folder(path, source, weights_dir, quiet=True), n_heads), layout, adapters)
    yield from regroup(
        _book_tensors(view, adapters),
        view.src.cfg,
        layout,
        from_model_layout,
        head_names(view.src.cfg, layout, view.head),
    )


def tensor_table(
    model: str | Path,
    layout: str = "book",
    source: str = "hf",
    weights_dir: str | Path | None = None,
    adapters: str = "merge",
    *,
    n_heads: int | None = None,
) -> list[dict]:
    """Name, shape, dtype and size in bytes of every tensor `iter_tensors` yields for `model`, from headers
    (a size name that is not downloaded is described from its preset, as float32)."""
    check_layout(layout)
    if os.path.exists(model) or os.path.exists(f"{model}.index"):
        src: Source | None = open_source(model, n_heads)
    else:
        folder = model_dir(str(model), source, weights_dir)  # a size, or a Hugging Face repo id
        src = open_source(folder) if folder.is_dir() else None
        if src is None and hf_repo(str(model))[0] not in PRESETS:
            raise Gpt2LoadError(f"{model} is not downloaded: run `gpt2load download {model}` first")
    if src is None:
        specs = layout_specs(GPTConfig.from_name(str(model)), layout)
    else:
        view = _view(src, layout, adapters)
        specs = specs_in_layout(_book_specs(view, adapters, src.dtype()), src.cfg, layout, view.head)
    return [
        {"name": n, "shape": list(s), "dtype": d, "bytes": torch.Size(s).numel() * getattr(torch, d).itemsize}
        for n, s, d in specs
    ]


__all__ = ["iter_tensors", "tensor_table"]
