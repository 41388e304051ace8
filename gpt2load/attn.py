"""Causal attention for bfloat16 inference: torch's scaled_dot_product_attention or gpt2load's attend.c, chosen by
measuring once per process and shape bucket (float32 always takes torch's: its flash attention is as fast)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import native
from .errors import Gpt2LoadError
from .kernels import best_seconds


def attention_setting() -> str:
    """GPT2LOAD_ATTENTION, read at each call: "sdpa" always takes torch's attention, "native" gpt2load's (an error
    where it cannot be built), unset or "auto" measures both per shape bucket."""
    value = os.environ.get("GPT2LOAD_ATTENTION", "").strip().lower() or "auto"
    if value not in ("auto", "sdpa", "native"):
        raise Gpt2LoadError(f"GPT2LOAD_ATTENTION={value!r} is not auto, sdpa or native: set one of them, or unset it")
    if value == "native" and native.native_setting() == "0":
        raise Gpt2LoadError("GPT2LOAD_ATTENTION=native contradicts GPT2LOAD_NATIVE=0: unset one of them")
    return value


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """torch's attention of q [B, H, Tq, D] over k, v [B, H, Tk, D], query i seeing keys up to i + Tk - Tq:
    [B, Tq, H, D] (a view)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    elif Tq == 1:  # the newest position sees everything
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    else:  # a chunk appended after cached positions: causal with an offset
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    return y.transpose(1, 2)


def _native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return native.attend(q, k, v)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, H, Tk, D], query i seeing keys up to i + Tk - Tq, without
    dropout: [B, Tq, H, D] (not necessarily contiguous). For inference: inputs that need gradients take torch's."""
    if (
        q.dtype is not torch.bfloat16
        or not q.is_cpu
        or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    ):
        return sdpa_causal(q, k, v)
    setting = attention_setting()
    if setting == "sdpa":
        return sdpa_causal(q, k, v)
    B, H, Tq, D = q.shape
    key = (B, H, _bucket(Tq), _bucket(k.shape[2]), D, torch.get_num_threads(), setting, native.native_setting())
    kernel = _chosen.get(key)
    if kernel is None:
        kernel = _chosen[key] = _choose(q, k, v, setting)
    if kernel is _native and not native.attend_usable(q, k, v):  # (a layout the bucket's first input did not have)
        kernel = sdpa_causal
    return kernel(q, k, v)


_chosen: dict[tuple, Callable] = {}  # (shape buckets, threads, settings) -> kernel


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, setting: str) -> Callable:
    if setting == "native":  # wherever it applies (checked at each call)
        if not native.attend_available():
            why = native.why_unavailable() or "it needs an AVX-512 CPU"
            raise Gpt2LoadError(f"GPT2LOAD_ATTENTION=native, but gpt2load's attention is unavailable: {why}")
        return _native
    if not native.attend_usable(q, k, v):
        return sdpa_causal
    if not torch.allclose(_native(q, k, v).float(), sdpa_causal(q, k, v).float(), atol=3e-2, rtol=3e-2):
        return sdpa_causal
    times = {
        kernel: best_seconds(lambda _, kernel=kernel: kernel(q, k, v), [None]) for kernel in (sdpa_causal, _native)
    }
    return min(times, key=times.get)
