"""Attention for inference: torch's scaled_dot_product_attention or gpt2load's attend.c (bfloat16 prompts, chunks
and tokens; one float32 query per row when decoding, with or without a mask), chosen by measuring once per
process and shape bucket (float32 prompts always take torch's: its flash attention is as fast there)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2load.errors import Gpt2LoadError
from gpt2load.fast import native
from gpt2load.fast.kernels import fastest


def attention_setting() -> str:
    """GPT2LOAD_ATTENTION, read at each call: "sdpa" always takes torch's attention, "native" gpt2load's (an error
    where it cannot be built), unset or "auto" measures both per shape bucket."""
    value = os.environ.get("GPT2LOAD_ATTENTION", "").strip().lower() or "auto"
    if value not in ("auto", "sdpa", "native"):
        raise Gpt2LoadError(f"GPT2LOAD_ATTENTION={value!r} is not auto, sdpa or native: set one of them, or unset it")
    if value == "native" and native.native_setting() == "0":
        raise Gpt2LoadError("GPT2LOAD_ATTENTION=native contradicts GPT2LOAD_NATIVE=0: unset one of them")
    return value


def sdpa_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """torch's attention of q [B, H, Tq, D] over k, v [B, H, Tk, D], query i seeing keys up to i + Tk - Tq, or
    where `mask` (broadcast to [B, H, Tq, Tk]) allows: [B, Tq, H, D] (a view)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    elif Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    elif Tq == 1:  # the newest position sees everything
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    else:  # a chunk appended after cached positions: causal with an offset
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    return y.transpose(1, 2)


def _torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return sdpa_causal(q, k, v, mask=mask)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return native.attend(q, k, v)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return native.attend_one(q, k, v, mask)


def _usable(kernel: Callable, q, k, v, mask) -> bool:
    if kernel is _attend:
        return mask is None and native.attend_usable(q, k, v)
    return native.attend_one_usable(q, k, v, mask)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, H, Tk, D], query i seeing keys up to i + Tk - Tq, or where
    `mask` allows, without dropout: [B, Tq, H, D] (not necessarily contiguous). For inference: inputs that need
    gradients take torch's.

    torch's attention, or one of attend.c's kernels where it applies (bfloat16 without a mask; one float32 query
    per row, decoding) and was measured faster for this shape bucket and layout (or is forced)."""
    if not q.is_cpu or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _torch(q, k, v, mask)
    if q.dtype is torch.bfloat16 and mask is None:
        ours = _attend
    elif q.dtype is torch.float32 and q.shape[2] == 1:
        ours = _attend_one
    else:
        return _torch(q, k, v, mask)
    setting = attention_setting()
    if setting == "sdpa":
        return _torch(q, k, v, mask)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    # everything the kernels' checks read beyond the buckets, so that they run once per key, not at every step
    layout = (q.stride(-1), k.stride(-1), v.stride(-1), k.dim(), k.shape == v.shape, k.shape[:2] == (B, H))
    layout += (k.shape[-1] == D, 0 < Tq <= Tk)
    if mask is not None:
        layout += (mask.dtype, mask.dim(), tuple(mask.shape[:-1]), mask.shape[-1] == Tk, mask.stride(-1))
    key = (ours, B, H, _bucket(Tq), _bucket(Tk), D, layout, torch.get_num_threads(), setting, native.native_setting())
    kernel = _chosen.get(key)
    if kernel is None:
        kernel = _chosen[key] = _choose(ours, q, k, v, mask, setting)
    return kernel(q, k, v, mask)


_chosen: dict[tuple, Callable] = {}  # (kernel, shape buckets, layout, threads, settings) -> kernel


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _choose(ours: Callable, q, k, v, mask, setting: str) -> Callable:
    if setting == "native" and not native.attend_available():
        why = native.why_unavailable() or "it needs an AVX-512 CPU"
        raise Gpt2LoadError(f"GPT2LOAD_ATTENTION=native, but gpt2load's attention is unavailable: {why}")
    if not _usable(ours, q, k, v, mask):
        return _torch
    if setting == "native":  # wherever it applies
        return ours
    tol = 3e-2 if q.dtype is torch.bfloat16 else 1e-4
    if not torch.allclose(ours(q, k, v, mask).float(), _torch(q, k, v, mask).float(), atol=tol, rtol=tol):
        return _torch
    candidates = (_torch, ours)
    return candidates[fastest([lambda _, kernel=kernel: kernel(q, k, v, mask) for kernel in candidates], [None], 4)]
