"""GPTModel-named tensors re-expressed in another layout, one at a time (and their shapes by arithmetic), and
the finiteness check every export runs on what it writes.

"book" is GPTModel's state_dict names and shapes (a tied head and the masks left out), "hf" a transformers
GPT-2's stored tensors (Conv1D [in, out] weights, fused q/k/v, "transformer." prefix), "openai" the names and
shapes of OpenAI's TensorFlow checkpoint. What a model on disk holds, in a layout, is `gpt2load.tensors`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import Gpt2LoadError
from ..model.build import dtype_name
from ..model.config import GPTConfig
from .names import (
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
from .ownform import head_shapes

T = TypeVar("T")
LAYOUTS: dict[str, tuple[NameMap | None, str]] = {"book": (None, ""), "hf": (HF, HF_PREFIX), "openai": (OPENAI, "")}
ADAPTER_MODES = ("merge", "list")
Spec = tuple[str, tuple[int, ...], str]  # (name, shape, dtype name)


def check_layout(layout: str) -> tuple[NameMap | None, str]:
    if layout not in LAYOUTS:
        raise Gpt2LoadError(f"unknown tensor layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def head_names(cfg: GPTConfig, layout: str, head: dict | None) -> dict[str, str]:
    """The `layout` names of an untied head's tensors ({} for a tied head, which no layout stores twice).

    book: out_head.weight (+ out_head.bias). hf: a [vocab, d] head is GPT2LMHeadModel's `lm_head.weight`, any
    other [n, d] head GPT2ForSequenceClassification's `score.weight`; a head with a bias is refused (neither
    class has one). openai: refused, OpenAI's checkpoint has no head of its own (GPT-2's is the embedding).
    """
    check_layout(layout)
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


def regroup(
    items: Iterable[tuple[str, T]], cfg: GPTConfig, layout: str, combine, heads: dict[str, str] | None = None
) -> Iterator[tuple[str, T]]:
    """(layout name, combine(parts, rule)) for GPTModel-named items, each as soon as all its parts have arrived;
    head tensors under `heads` names (nn.Linear's layout in every format).

    The fused q/k/v projection needs three GPTModel tensors; they are held only until the third arrives.
    """
    name_map, prefix = check_layout(layout)
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
    return regroup(book, cfg, layout, from_model_layout, head_names(cfg, layout, head))


def _source_shape(parts: list[tuple[int, ...]], rule: Rule) -> tuple[int, ...]:
    """The shape from_model_layout gives for parts of these shapes, by arithmetic alone."""
    shape = (sum(p[0] for p in parts), *parts[0][1:])
    if rule.layout in (CONV1D, CONV1D_3D):
        shape = shape[::-1]
    return (1, *shape) if rule.layout == CONV1D_3D else shape


def specs_in_layout(specs: list[Spec], cfg: GPTConfig, layout: str, head: dict | None) -> list[Spec]:
    dtypes = {n: d for n, _, d in specs}
    heads = head_names(cfg, layout, head)

    def combine(parts: list[tuple[tuple[int, ...], str]], rule: Rule) -> tuple[tuple[int, ...], str]:
        return _source_shape([s for s, _ in parts], rule), parts[0][1]

    items = ((n, (s, dtypes[n])) for n, s, _ in specs)
    return [(n, tuple(s), d) for n, (s, d) in regroup(items, cfg, layout, combine, heads)]


def layout_specs(
    cfg: GPTConfig, layout: str, dtype: torch.dtype = torch.float32, head: dict | None = None
) -> list[Spec]:
    """(name, shape, dtype name) of every tensor of a model of `cfg` (and untied `head`) in `layout`, in the
    order `to_layout` yields them from GPTModel's order, by arithmetic on shapes (nothing allocated)."""
    shapes = {**expected_shapes(cfg), **head_shapes(cfg, head)}
    return specs_in_layout([(k, s, dtype_name(dtype)) for k, s in shapes.items()], cfg, layout, head)


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
