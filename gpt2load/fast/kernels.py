"""Speed tricks the stock modules use on themselves when nothing else is watching.

A module takes a fast path only when it is exactly gpt2load's (or torch's) class, no hook is registered on it
(or globally), and no gradient is being recorded: a user's LoRA wrapper, subclass or hook is called as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from gpt2load.errors import Gpt2LoadError
from gpt2load.fast import native


def _no_global_hooks() -> bool:
    return not (
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or getattr(_module, "_global_forward_hooks_always_called", None)
    )


def is_stock(modules: Iterable[nn.Module], types: Iterable[type]) -> bool:
    """True when each module is exactly of its type (not a subclass, not a replacement) and no forward hook is
    registered on it or globally. (Backward hooks do not matter: fast paths run only without autograd.)"""
    for m, cls in zip(modules, types, strict=True):
        if type(m) is not cls or m._forward_hooks or m._forward_pre_hooks:
            return False
    return _no_global_hooks()


def fast_enabled(module: nn.Module) -> bool:
    """Fast paths are for inference: autograd and dropout must see the modules' own operations."""
    return not torch.is_grad_enabled() and not module.training


def _plain(x, w, b, gelu=False):
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


def _onednn(x, w, b, gelu=False):
    op = _ops.get("linear") or _ops.setdefault("linear", torch.ops.mkldnn._linear_pointwise)  # looked up once
    return op(x, w, b, "gelu", [], "tanh") if gelu else op(x, w, b, "none", [], "")


_ops: dict[str, Callable] = {}


@functools.cache  # `_split` asks at every call
def split_pieces(out: int, threads: int) -> int:
    """How many row blocks `_split` cuts an [out, in] weight into: a multiple of the thread count that divides
    `out` if one does (up to 8 per thread), else two per thread and a remainder; 0 when blocks would be tiny."""
    step = max(threads, 1)
    for s in range(step, 8 * step + 1, step):
        if s >= 2 and out % s == 0 and out // s >= 64:
            return s
    s = max(2, 2 * step)
    return s if out // s >= 64 else 0


def _split(x, w, b, gelu=False):
    """x [M, in] times w [out, in].T as a batch of matrix-vector products over row blocks of w (torch.bmm).

    Batched, each thread streams its own blocks of the weight with a matrix-vector kernel: for a few rows this
    reads weights at close to memory bandwidth, where `F.linear` (a matrix-matrix kernel) and oneDNN's op
    reach about half and three quarters of it on some CPUs. Rows past the last whole block go through F.linear.
    """
    (out, d), M = w.shape, x.shape[0]
    s = split_pieces(out, torch.get_num_threads())
    o = out // s
    main = o * s
    xt = x.t().expand(s, d, M)  # the same x for every block, without copies
    whole = main == out  # (slicing costs a few microseconds per call)
    blocks = (w if whole else w[:main]).view(s, o, d)
    if b is None:
        y = torch.bmm(blocks, xt)
    else:
        y = torch.baddbmm((b if whole else b[:main]).reshape(s, o, 1), blocks, xt)
    y = y.view(main, M).t()
    if main < out:
        y = torch.cat((y, F.linear(x, w[main:], None if b is None else b[main:])), 1)
    elif M > 1:
        y = y.contiguous()
    return F.gelu(y, approximate="tanh") if gelu else y


@functools.cache
def onednn_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's private matmul op exists here and agrees with `F.linear` on a small case."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen).to(dtype) for s in ((3, 16), (8, 16), (8,)))
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        with torch.inference_mode():
            return all(
                torch.allclose(_onednn(x, w, bias, gelu).float(), _plain(x, w, bias, gelu).float(), atol=tol)
                for bias in (b, None)
                for gelu in (False, True)
            )
    except (AttributeError, RuntimeError):
        return False


def _rows_bucket(rows: int) -> int:
    """Calibration buckets of the number of rows a matmul sees (decoding, batches/beams, prompts)."""
    return 1 if rows <= 1 else 4 if rows <= 4 else 16 if rows <= 16 else 256 if rows <= 256 else 4096


_COLD_BYTES = 48 << 20  # weights timed in turn until this much: more than the caches hold, as in decoding


def fastest(fns: list[Callable], items: list, reps: int = 2) -> int:
    """Index of the fastest of `fns`, each timed by a pass calling it on every one of `items`: a pass each of
    warm-up (the first call allocates and packs), then `reps` rounds in which each takes a pass in turn, its best
    kept. Interleaved, a burst of load on a shared machine hits every candidate rather than the one timed during
    it. Ties go to the first."""
    best = [float("inf")] * len(fns)
    for rep in range(reps + 1):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for item in items:
                fn(item)
            if rep:
                best[i] = min(best[i], time.perf_counter() - start)
    return min(range(len(fns)), key=best.__getitem__)


_chosen: dict[tuple, Callable] = {}  # (kernels, dtype, rows bucket, weight shape, bias, gelu, threads) -> kernel


def calibrated(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    gelu: bool,
    kernels: tuple,
    extra: tuple = (),
    ref: Callable | None = None,
) -> Callable:
    """The fastest of `kernels`, called `k(x, w, b, gelu, *extra)`, on this shape at this thread count, measured
    once per process; another kernel than the first only if it also agrees with `ref` (default: the first) on
    this very input.

    Decoding reads every weight from memory at each step (a model does not fit in the caches), and which kernel
    streams a weight faster is not which one wins on a weight already in cache: for up to 16 rows, each kernel is
    timed over copies of the weight that together exceed the caches. With more rows the arithmetic dominates
    and the weight itself is timed."""
    rows = _rows_bucket(x.numel() // x.shape[-1])
    key = (kernels, x.dtype, rows, w.shape, b is None, gelu, torch.get_num_threads())
    kernel = _chosen.get(key)
    if kernel is None:
        kernel = kernels[0]
        try:
            want = (ref or kernel)(x, w, b, gelu, *extra).float()
            tol = 1e-4 if x.dtype == torch.float32 else 5e-2
            agree = [
                k for k in kernels[1:] if torch.allclose(k(x, w, b, gelu, *extra).float(), want, atol=tol, rtol=tol)
            ]
            if agree:
                size = w.numel() * w.element_size()
                weights = [w] + [w.clone() for _ in range(min(31, _COLD_BYTES // size) if rows <= 16 else 0)]
                reps = 3 if len(weights) > 1 else 4  # one weight: a single call per pass, closer to each other
                candidates = [kernel, *agree]
                fns = [lambda m, k=k: k(x, m, b, gelu, *extra) for k in candidates]
                kernel = candidates[fastest(fns, weights, reps)]
                del weights
        except RuntimeError:
            pass
        _chosen[key] = kernel
    return kernel


def _native(x, w, b, gelu=False):
    """gpt2load's own kernels (native.py): for a few rows gemv.c, which reads float32 and bfloat16 weights at close
    to the same bytes per second (bfloat16 decoding reads its half of the bytes in about half the time); for
    bfloat16 prompts gemm.c, with the bias and GELU added before rounding."""
    if x.shape[0] > native.MAX_ROWS:
        return native.gemm(x, w, b, gelu)
    y = native.gemv(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


_KERNELS = {"plain": _plain, "onednn": _onednn, "split": _split, "native": _native}


def matmul_setting() -> str:
    """The kernel choice the environment asks for, read at each call: GPT2LOAD_MATMUL=plain|onednn|split|native
    forces one (where it works), GPT2LOAD_ONEDNN=0 never uses oneDNN's private op and =1 always does,
    GPT2LOAD_NATIVE=0 never builds or uses gpt2load's C kernels; otherwise (unset, "auto") every kernel is
    measured per shape. Returns "auto", "no-onednn" or a kernel's name."""
    forced = os.environ.get("GPT2LOAD_MATMUL", "").strip().lower() or "auto"
    if forced not in ("auto", *_KERNELS):
        raise Gpt2LoadError(
            f"GPT2LOAD_MATMUL={forced!r} is not one of auto, {', '.join(_KERNELS)}: set one of them, or unset it"
        )
    onednn = onednn_setting()
    if forced != "auto":
        if (onednn == "0" and forced == "onednn") or (onednn == "1" and forced != "onednn"):
            raise Gpt2LoadError(f"GPT2LOAD_MATMUL={forced} contradicts GPT2LOAD_ONEDNN={onednn}: unset one of them")
        if forced == "native" and native.native_setting() == "0":
            raise Gpt2LoadError("GPT2LOAD_MATMUL=native contradicts GPT2LOAD_NATIVE=0: unset one of them")
        return forced
    return {"0": "no-onednn", "1": "onednn"}.get(onednn, "auto")


def onednn_setting() -> str:
    """GPT2LOAD_ONEDNN, read at each call: "0" never uses oneDNN's private op, "1" always (where it works),
    unset or "auto" measures it against the other kernels per shape."""
    raw = os.environ.get("GPT2LOAD_ONEDNN")
    if raw is None:
        return "auto"
    value = raw.strip().lower() or "auto"
    if value not in ("0", "1", "auto"):
        raise Gpt2LoadError(f"GPT2LOAD_ONEDNN={value!r} is not 0, 1 or auto: set one of them, or unset it")
    return value


_FAST_DTYPES = (torch.float32, torch.bfloat16)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """`F.linear` (then tanh-GELU if asked) by the fastest kernel for x's device, dtype and shape.

    On CPU there are four ways to do it: F.linear, oneDNN's op (reads the weights of nn.Linear at close to
    memory bandwidth on some CPUs and not on others; private, so also checked against F.linear before use),
    `_split` (a batch of matrix-vector products over row blocks of the weight, fastest for one float32 row here)
    and `_native` (gpt2load's own C kernels: fastest for bfloat16 weights and several rows here, and for
    bfloat16 prompts on AVX512-BF16).
    Which one is chosen by measuring (see `matmul_setting`). Decoding calls this about 50 times per token, so
    the choice is remembered per weight shape, input shape, setting and thread count.
    """
    key = (w.shape, w.dtype, x.shape, x.dtype, x.is_cpu, b is None, gelu, w.is_contiguous())
    key += tuple(os.environ.get(v) for v in SETTINGS) + (torch.get_num_threads(),)
    fn = _resolved.get(key)
    if fn is None:
        if len(_resolved) > 4096:  # many shapes (prompts of every length): start over
            _resolved.clear()
        fn = _resolved[key] = _resolve(x, w, b, gelu)
    return fn(x, w, b, gelu)


_resolved: dict[tuple, Callable] = {}
SETTINGS = ("GPT2LOAD_MATMUL", "GPT2LOAD_ONEDNN", "GPT2LOAD_NATIVE")  # part of `linear`'s memo key


def _resolve(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> Callable:
    """The kernel `linear` uses for these operands (they are not kept: only their shapes and dtypes matter)."""
    dtype = x.dtype
    if dtype not in _FAST_DTYPES or w.dtype is not dtype or not x.is_cpu:
        return _plain
    setting = matmul_setting()
    flat = x.reshape(-1, x.shape[-1])
    kernels = [_plain]
    if setting in ("auto", "onednn") and onednn_works(dtype):
        kernels.append(_onednn)
    if setting in ("auto", "no-onednn", "split") and flat.shape[0] <= 16 and w.is_contiguous():
        if split_pieces(w.shape[0], torch.get_num_threads()):
            kernels.append(_split)
    if setting in ("auto", "no-onednn", "native") and (native.usable(flat, w) or native.gemm_usable(flat, w)):
        kernels.append(_native)
    if setting == "native" and not native.available():  # (forced: float32 prompts still go to F.linear)
        raise Gpt2LoadError(f"GPT2LOAD_MATMUL=native, but gpt2load's kernel is unavailable: {native.why_unavailable()}")
    if setting in _KERNELS:  # forced: that kernel where it works, else F.linear
        kernel = _KERNELS[setting] if _KERNELS[setting] in kernels else _plain
    else:  # as one [rows, in] matrix: oneDNN may otherwise treat [B, 1, in] as B products that each read w
        kernel = calibrated(flat, w, b, gelu, tuple(kernels)) if len(kernels) > 1 else _plain
    if kernel is _plain or x.dim() == 2 or (kernel is _onednn and x.dim() == 3 and x.shape[0] == 1):
        return kernel
    return _flat(kernel)


def _flat(kernel: Callable) -> Callable:
    """`kernel` on x of any rank, as one [rows, in] matrix."""

    def flattened(x, w, b, gelu):
        y = kernel(x.reshape(-1, x.shape[-1]), w, b, gelu)
        return y.view(*x.shape[:-1], y.shape[-1])

    flattened.kernel = kernel  # which kernel runs (for tests)
    return flattened


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


__all__ = [
    "Stacked",
    "fast_enabled",
    "is_stock",
    "linear",
    "matmul_setting",
    "onednn_setting",
    "split_pieces",
    "stacked",
]
