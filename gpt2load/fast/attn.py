"""Attention for inference: torch's scaled_dot_product_attention or gpt2load's attend.c (bfloat16 prompts, chunks
and tokens; one float32 query per row when decoding, with or without a mask). `Kernels.attention` (registry.py)
holds which one each shape bucket uses; this module has the candidates and the measurement (float32 prompts
always take torch's: its flash attention is as fast there)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import Gpt2LoadError
from ..model.gpt import sdpa_causal
from . import native
from .kernels import fastest


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return sdpa_causal(q, k, v, mask=mask)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return native.attend(q, k, v)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return native.attend_one(q, k, v, mask)


def candidate(q: torch.Tensor, mask: torch.Tensor | None) -> Callable | None:
    """attend.c's kernel for this kind of call (bfloat16 without a mask; one float32 query per row), or None."""
    if q.dtype is torch.bfloat16 and mask is None:
        return _attend
    if q.dtype is torch.float32 and q.shape[2] == 1:
        return _attend_one
    return None


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def shape_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """The shape buckets, and everything the kernels' checks read beyond them, so that a choice is made once per
    key, not at every step."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    layout = (q.stride(-1), k.stride(-1), v.stride(-1), k.dim(), k.shape == v.shape, k.shape[:2] == (B, H))
    layout += (k.shape[-1] == D, 0 < Tq <= Tk)
    if mask is not None:
        layout += (mask.dtype, mask.dim(), tuple(mask.shape[:-1]), mask.shape[-1] == Tk, mask.stride(-1))
    return (B, H, _bucket(Tq), _bucket(Tk), D, layout)


def _usable(kernel: Callable, q, k, v, mask) -> bool:
    if kernel is _attend:
        return mask is None and native.attend_usable(q, k, v)
    return native.attend_one_usable(q, k, v, mask)


def choose(ours: Callable, q, k, v, mask, forced: bool) -> Callable:
    """`ours` where it takes these inputs and (unless `forced`) agrees with torch's and was measured faster."""
    if forced and not native.attend_available():
        why = native.why_unavailable() or "it needs an AVX-512 CPU"
        raise Gpt2LoadError(f"GPT2LOAD_ATTENTION=native, but gpt2load's attention is unavailable: {why}")
    if not _usable(ours, q, k, v, mask):
        return sdpa
    if forced:  # wherever it applies
        return ours
    tol = 3e-2 if q.dtype is torch.bfloat16 else 1e-4
    if not torch.allclose(ours(q, k, v, mask).float(), sdpa(q, k, v, mask).float(), atol=tol, rtol=tol):
        return sdpa
    candidates = (sdpa, ours)
    return candidates[fastest([lambda _, kernel=kernel: kernel(q, k, v, mask) for kernel in candidates], [None], 4)]


__all__ = ["candidate", "choose", "sdpa", "sdpa_causal", "shape_key"]
