"""The matmul kernels the speed layer chooses between, and the timing that chooses: stateless functions (the
choices themselves live in a `Kernels` object, registry.py).

Four ways to compute `F.linear` on a CPU: F.linear itself, oneDNN's private op, `_split` (a batch of
matrix-vector products over row blocks of the weight) and `_native` (gpt2load's own C kernels).
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import native


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


def _native(x, w, b, gelu=False):
    """gpt2load's own kernels (native.py): for a few rows gemv.c, which reads float32 and bfloat16 weights at close
    to the same bytes per second (bfloat16 decoding reads its half of the bytes in about half the time); for
    bfloat16 prompts gemm.c, with the bias and GELU added before rounding."""
    if x.shape[0] > native.MAX_ROWS:
        return native.gemm(x, w, b, gelu)
    y = native.gemv(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


KERNELS = {"plain": _plain, "onednn": _onednn, "split": _split, "native": _native}


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


__all__ = ["KERNELS", "Stacked", "fastest", "onednn_works", "split_pieces", "stacked"]
