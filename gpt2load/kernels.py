"""Speed tricks the stock modules use on themselves when nothing else is watching.

A module takes a fast path only when it is exactly gpt2load's (or torch's) class, no hook is registered on it
(or globally), and no gradient is being recorded: a user's LoRA wrapper, subclass or hook is called as it is.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module


def _no_global_hooks() -> bool:
    return not (
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or getattr(_module, "_global_forward_hooks_always_called", None)
    )


def is_stock(modules: Iterable[nn.Module], types: Iterable[type]) -> bool:
    """True when each module is exactly of its type (not a subclass, not a replacement) and has no hooks."""
    for m, cls in zip(modules, types, strict=True):
        if type(m) is not cls or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return False
        if getattr(m, "_backward_pre_hooks", None):
            return False
    return _no_global_hooks()


def fast_enabled(module: nn.Module) -> bool:
    """Fast paths are for inference: autograd and dropout must see the modules' own operations."""
    return not torch.is_grad_enabled() and not module.training


@functools.cache
def linear_for(device_type: str, dtype: torch.dtype) -> Callable:
    """The fastest correct `linear(x, weight, bias, gelu=False)` for this device and dtype.

    On CPU, oneDNN's matmul reads the [out, in] weights of nn.Linear at close to memory bandwidth for one or a
    few rows, where `F.linear` reaches about half of it; decoding is bound by reading the weights, so this is
    most of the speed. It is a private torch op, so it is checked against `F.linear` before it is used.
    """

    def plain(x, w, b, gelu=False):
        y = F.linear(x, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y

    if device_type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return plain

    def onednn(x, w, b, gelu=False):
        return op(x, w, b, "gelu", [], "tanh") if gelu else op(x, w, b, "none", [], "")

    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((3, 16), (8, 16), (8,)))
        with torch.inference_mode():
            ok = all(
                torch.allclose(onednn(x, w, bias, gelu), plain(x, w, bias, gelu), atol=1e-5)
                for bias in (b, None)
                for gelu in (False, True)
            )
    except (AttributeError, RuntimeError):
        return plain
    return onednn if ok else plain


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """`F.linear` (then tanh-GELU if asked) by the fastest kernel for x's device and dtype."""
    # As one [rows, in] matrix: oneDNN may otherwise treat [B, 1, in] as B products that each read the weight.
    y = linear_for(x.device.type, x.dtype)(x.reshape(-1, x.shape[-1]), w, b, gelu)
    return y.view(*x.shape[:-1], y.shape[-1])


def _adjacent(parts: list[torch.Tensor]) -> bool:
    first = parts[0]
    step = first.numel() * first.element_size()
    return all(
        p.device.type == "cpu"
        and p.is_contiguous()
        and p.dtype == first.dtype
        and p.shape == first.shape
        and p.data_ptr() == first.data_ptr() + i * step
        for i, p in enumerate(parts)
    )


def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)` of same-shaped tensors, without a copy when they lie back to back in memory.

    gpt2load's files keep each layer's query, key and value weights adjacent, and loading maps them in place
    (each its own storage, so saving one saves only its bytes): the stacked [3d, d] matrix is then an alias of
    that memory. The caller must keep `parts` alive as long as the result (the alias does not own the memory).
    """
    if len(parts) > 1 and _adjacent(parts):
        first = parts[0]
        raw = (ctypes.c_byte * (len(parts) * first.numel() * first.element_size())).from_address(first.data_ptr())
        return torch.frombuffer(raw, dtype=first.dtype).view(len(parts) * first.shape[0], *first.shape[1:])
    return torch.cat(parts)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version  # bumped by every in-place change
    except RuntimeError:  # an inference tensor: it cannot be changed in place outside inference mode
        return -1


class Stacked:
    """A stacked copy/alias of some tensors, rebuilt when any of them is replaced or changed in place."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.parts: list[torch.Tensor] = []  # keeps the aliased memory alive
        self.value: torch.Tensor | None = None

    def __getstate__(self) -> dict:  # copies and pickles of a model rebuild it on first use
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def get(self, parts: list[torch.Tensor]) -> torch.Tensor:
        key = tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in parts)
        if key != self.key:
            with torch.no_grad():
                self.parts, self.value, self.key = list(parts), stacked(list(parts)), key
        return self.value


__all__ = ["Stacked", "fast_enabled", "is_stock", "linear", "linear_for", "stacked"]
