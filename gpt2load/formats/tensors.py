"""The tensors of the model `load_gpt2` would build, one at a time, in the layout a pipeline asks for.

"book" is GPTModel's state_dict names and shapes (a tied head and the masks left out), "hf" a transformers
GPT-2's stored tensors (Conv1D [in, out] weights, fused q/k/v, "transformer." prefix), "openai" the names and
shapes of OpenAI's TensorFlow checkpoint. Nothing builds a model; tensors keep their stored dtype.

What load_gpt2 would build: an untied or classifier head as the files hold it, LoRA adapters saved unmerged
(fine-tuning's --no-merge) merged into their weights (or listed beside the base weights), an int8 file as its
int8 matrices and float32 scales. Also the finiteness check every export runs on what it writes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.layouts import Source, open_source
from gpt2load.formats.names import (
    CONV1D,
    CONV1D_3D,
    HF,
    HF_PREFIX,
    OPENAI,
    NameMap,
    Rule,
    expected_shapes,
    from_model_layout,
)
from gpt2load.formats.ownform import head_shapes
from gpt2load.hub.fetch import model_dir
from gpt2load.load import model_folder, quantized_layout
from gpt2load.model.build import dtype_name
from gpt2load.model.config import GPTConfig, resolve_size
from gpt2load.model.lora import read_adapters

T = TypeVar("T")
LAYOUTS: dict[str, tuple[NameMap | None, str]] = {"book": (None, ""), "hf": (HF, HF_PREFIX), "openai": (OPENAI, "")}
ADAPTER_MODES = ("merge", "list")
Spec = tuple[str, tuple[int, ...], str]  # (name, shape, dtype name)


def _layout(layout: str) -> tuple[NameMap | None, str]:
    if layout not in LAYOUTS:
        raise Gpt2LoadError(f"unknown tensor layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def head_names(cfg: GPTConfig, layout: str, head: dict | None) -> dict[str, str]:
    """The `layout` names of an untied head's tensors ({} for a tied head, which no layout stores twice).

    book: out_head.weight (+ out_head.bias). hf: a [vocab, d] head is GPT2LMHeadModel's `lm_head.weight`, any
    other [n, d] head GPT2ForSequenceClassification's `score.weight`; a head with a bias is refused (neither
    class has one). openai: refused, OpenAI's checkpoint has no head of its own (GPT-2's is the embedding).
    """
    _layout(layout)
    if not head or head.get("tied", True):
        return {}
    shape, bias = tuple(head.get("shape", (cfg.vocab_size, cfg.emb_dim))), bool(head.get("bias"))
    if layout == "book":
        return {"out_head.weight": "out_head.weight", **({"out_head.bias": "out_head.bias"} if bias else {})}
    what = f"{list(shape)}{' with a bias' if bias else ''}"
    if layout == "hf" and not bias:
        return {"out_head.weight": "lm_head.weight" if shape == (cfg.vocab_size, cfg.emb_dim) else "score.weight"}
    if layout == "hf":
        raise Gpt2LoadError(
            f"the model's head {what} has a bias, which transformers' GPT-2 layouts have no name for "
            "(lm_head and score have none): use layout book"
        )
    raise Gpt2LoadError(
        f"the model's head is its own {what}, and OpenAI's TensorFlow layout has no name for one (GPT-2's head "
        "is the token embedding): use layout book or hf"
    )


def _regroup(
    items: Iterable[tuple[str, T]], cfg: GPTConfig, layout: str, combine, heads: dict[str, str] | None = None
) -> Iterator[tuple[str, T]]:
    """(layout name, combine(parts, rule)) for GPTModel-named items, each as soon as all its parts have arrived;
    head tensors under `heads` names (nn.Linear's layout in every format).

    The fused q/k/v projection needs three GPTModel tensors; they are held only until the third arrives.
    """
    name_map, prefix = _layout(layout)
    if name_map is None:
        yield from items
        return
    heads = heads or {}
    owner = {t: (src, rule, targets) for src, rule, targets in name_map.inverse(cfg) for t in targets}
    held: dict[str, T] = {}
    for name, item in items:
        if name in heads:
            yield heads[name], item
            continue
        if name not in owner:  # callers refuse what a layout cannot name up front; this guards the rest
            raise Gpt2LoadError(f"tensor {name} has no name in the {layout} layout: use layout book")
        src, rule, targets = owner[name]
        held[name] = item
        if all(x in held for x in targets):
            yield prefix + src, combine([held.pop(x) for x in targets], rule)


def to_layout(
    book: Iterable[tuple[str, torch.Tensor]], cfg: GPTConfig, layout: str, head: dict | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """GPTModel-named tensors re-expressed in `layout`, one tensor (or one fused q/k/v) at a time; `head` (as
    `GPTModel.head_meta()` gives it) names an untied head's tensors, see `head_names`."""
    return _regroup(book, cfg, layout, from_model_layout, head_names(cfg, layout, head))


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
    _layout(layout)
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
    yield from _regroup(
        _book_tensors(view, adapters),
        view.src.cfg,
        layout,
        from_model_layout,
        head_names(view.src.cfg, layout, view.head),
    )


def _source_shape(parts: list[tuple[int, ...]], rule: Rule) -> tuple[int, ...]:
    """The shape from_model_layout gives for parts of these shapes, by arithmetic alone."""
    shape = (sum(p[0] for p in parts), *parts[0][1:])
    if rule.layout in (CONV1D, CONV1D_3D):
        shape = shape[::-1]
    return (1, *shape) if rule.layout == CONV1D_3D else shape


def _layout_specs(specs: list[Spec], cfg: GPTConfig, layout: str, head: dict | None) -> list[Spec]:
    dtypes = {n: d for n, _, d in specs}
    heads = head_names(cfg, layout, head)

    def combine(parts: list[tuple[tuple[int, ...], str]], rule: Rule) -> tuple[tuple[int, ...], str]:
        return _source_shape([s for s, _ in parts], rule), parts[0][1]

    items = ((n, (s, dtypes[n])) for n, s, _ in specs)
    return [(n, tuple(s), d) for n, (s, d) in _regroup(items, cfg, layout, combine, heads)]


def layout_specs(
    cfg: GPTConfig, layout: str, dtype: torch.dtype = torch.float32, head: dict | None = None
) -> list[Spec]:
    """(name, shape, dtype name) of every tensor of a model of `cfg` (and untied `head`) in `layout`, in the
    order `to_layout` yields them from GPTModel's order, by arithmetic on shapes (nothing allocated)."""
    shapes = {**expected_shapes(cfg), **head_shapes(cfg, head)}
    return _layout_specs([(k, s, dtype_name(dtype)) for k, s in shapes.items()], cfg, layout, head)


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
    _layout(layout)
    if os.path.exists(model) or os.path.exists(f"{model}.index"):
        src: Source | None = open_source(model, n_heads)
    else:
        folder = model_dir(resolve_size(str(model)), source, weights_dir)
        src = open_source(folder) if folder.is_dir() else None
    if src is None:
        specs = layout_specs(GPTConfig.from_name(str(model)), layout)
    else:
        view = _view(src, layout, adapters)
        specs = _layout_specs(_book_specs(view, adapters, src.dtype()), src.cfg, layout, view.head)
    return [
        {"name": n, "shape": list(s), "dtype": d, "bytes": torch.Size(s).numel() * getattr(torch, d).itemsize}
        for n, s, d in specs
    ]


class NonFiniteWeightsWarning(UserWarning):
    """An export is writing NaN or infinite weights (strict=True refuses such an export instead)."""


def _nonfinite(t: torch.Tensor, dtype: torch.dtype) -> tuple[int, bool]:
    """(how many values of `t` are NaN or infinite once cast to `dtype`, whether all of them were finite
    before: an overflow), a few hundred KB at a time (isfinite's temporaries the size of an embedding would
    double an export's peak memory)."""
    t = t.detach()
    rows = t.split(max(1, (1 << 18) // max(1, t[0].numel()))) if t.dim() > 1 else t.split(1 << 18)
    bad = before = 0
    for part in rows:
        cast = part.to(dtype)
        if not bool(torch.isfinite(cast).all()):
            bad += int(cast.numel() - torch.isfinite(cast).sum())
            before += int(part.numel() - torch.isfinite(part).sum())
    return bad, before == 0


def check_finite(tensors: Iterable[tuple[str, torch.Tensor, torch.dtype]], out: str | Path, strict: bool) -> None:
    """Look for NaN and inf in float tensors as they will be written to `out`, each cast to its dtype (so a
    float16 export of values beyond 65504 counts). One NonFiniteWeightsWarning naming the first bad tensor and
    the counts; with `strict`, a Gpt2LoadError at the first bad tensor instead (call it before writing)."""
    first, n_tensors, n_values = "", 0, 0
    for name, t, dtype in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        bad, overflow = _nonfinite(t, dtype)
        if not bad:
            continue
        values = f"value{'s' if bad > 1 else ''}"
        cause = f"{bad} {values} beyond {dtype_name(dtype)}'s range" if overflow else f"{bad} NaN or infinite {values}"
        if strict:
            fix = "export in float32" if overflow else "fix or retrain the model"
            raise Gpt2LoadError(f"tensor {name} has {cause}: refusing to write {out} (strict); {fix}")
        first = first or f"{name} ({cause})"
        n_tensors, n_values = n_tensors + 1, n_values + bad
    if first:
        warnings.warn(
            f"writing {n_values} non-finite weights in {n_tensors} tensors to {out}, the first in {first}: the "
            "model will compute NaN; strict=True (--strict) refuses such exports",
            NonFiniteWeightsWarning,
            stacklevel=3,
        )
