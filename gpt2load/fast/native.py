"""gpt2load's own C kernels, built once per machine with the C compiler and loaded with ctypes.

gemv.c, the matrix-vector product: decoding reads every weight once per token; torch's kernels stream float32
weights at up to about 70% of memory bandwidth for one row here, but bfloat16 and int8 weights at a fraction of
it. gemv.c reads all three at close to the same bytes per second, so half or a quarter of the bytes take about half
or a quarter of the time. gemm.c, the bfloat16 matrix-matrix product for prompts (AVX512-BF16 only): packs the
weight a panel at a time instead of reordering all of it at every call, with the bias and GELU added in
registers. attend.c, causal attention over bfloat16 (AVX-512 only): torch's CPU flash attention is no faster in
bfloat16 than in float32; and float32 decoding attention (one query per row, optional mask), which streams the
cached keys and values once where torch's took several times their reading time. Each is one more candidate for
a measurement per shape (`kernels.linear`, `int8mm.int8_linear`, `attn.causal_attention`), never assumed faster.

Built, cached and loaded by native_build.py.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

from ..settings import Settings
from .native_build import Unusable, load_library

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
MAX_ROWS = 16  # beyond a few rows the arithmetic dominates and torch's matrix-matrix kernels win


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not): built or found once per process, with the compiler and cache folder
    the environment names at that moment (the settings are read once, here, like a process's loaded library).
    Why not is a one-line notice on stderr (the kernels are only candidates: torch's run instead), except when
    no `cc` exists and CC is unset. Whether the kernels are used at all is the Kernels' settings' choice
    (GPT2LOAD_NATIVE=0: this is never called)."""
    try:
        return load_library(Settings.from_env()), ""
    except Unusable as e:
        if not e.quiet:
            print(f"gpt2load: notice: gpt2load's C kernels are unavailable, torch's run instead: {e}", file=sys.stderr)
        return None, str(e)


def available() -> bool:
    """Whether the kernels build and load here."""
    return _library()[0] is not None


def why_unavailable() -> str:
    return _library()[1]


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemv` takes these operands (it is then still measured against the other kernels)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and w.dtype in _CODES
        and w.dim() == 2
        and w.is_contiguous()
        and x.shape[-1] == w.shape[1]
        and 0 < rows <= MAX_ROWS
        and available()
    )


def _check(status: int, kernel: str, needs: str, buffer: str) -> None:
    """A kernel's return code: 2 when this build lacks the instructions it needs, 1 when out of memory."""
    if status == 2:
        raise RuntimeError(f"{kernel} was built without {needs}: check its *_usable first")
    if status:
        raise MemoryError(f"{kernel} could not allocate {buffer}")


@functools.cache
def _gemm_built(lib: ctypes.CDLL) -> bool:
    return bool(lib.gpt2load_gemm_supported())  # gemm.c has a kernel only in AVX512-BF16 builds


def gemm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemm` takes these operands: bfloat16 x [..., K] with more than MAX_ROWS rows (fewer: gemv) and w
    [N, K] contiguous on CPU, N a multiple of 16, K even, and a build with AVX512-BF16."""
    rows = x.numel() // max(1, x.shape[-1])
    if not (
        x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.dtype == w.dtype == torch.bfloat16
        and w.dim() == 2
        and w.is_contiguous()
        and x.shape[-1] == w.shape[1]
        and w.shape[0] % 16 == 0
        and w.shape[1] % 2 == 0
        and w.numel() > 0
        and rows > MAX_ROWS
    ):
        return False
    lib = _library()[0]
    return lib is not None and _gemm_built(lib)


def gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x [M, K] @ w [N, K].T + b, then tanh-GELU if asked, for bfloat16 operands `gemm_usable` accepted (any M):
    [M, N] bfloat16, float32 sums rounded once."""
    (n, k), m = w.shape, x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or n % 16 or k % 2 or (b is not None and b.numel() != n):
        sizes = ", ".join(f"{name} {list(t.shape)}" for name, t in (("x", x), ("w", w), ("b", b)) if t is not None)
        raise ValueError(f"gemm: shapes do not fit ({sizes}; out a multiple of 16, in even)")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ValueError(f"gemm: x and w must be bfloat16, not {x.dtype} and {w.dtype}")
    x, w = x.contiguous(), w.contiguous()
    b = None if b is None else b.to(torch.bfloat16).contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16)
    if m == 0:
        return y
    fn = _library()[0].gpt2load_gemm
    args = (x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), m, n, k, int(gelu))
    _check(fn(*args, torch.get_num_threads()), "gemm.c", "AVX512-BF16", "its packed weight panel")
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ (w [out, in] * scale[:, None]).T + b, in x's dtype (float32 or bfloat16), for operands that
    `usable` accepted. w is float32, bfloat16 or int8 (int8 with per-row scales)."""
    fn = _library()[0].gpt2load_gemv
    n = w.shape[0]
    if x.dim() != 2 or x.shape[1] != w.shape[1] or any(t is not None and t.numel() != n for t in (b, scale)):
        sizes = ", ".join(
            f"{name} {list(t.shape)}" for name, t in (("x", x), ("w", w), ("b", b), ("scale", scale)) if t is not None
        )
        raise ValueError(f"gemv: shapes do not fit ({sizes})")
    x = x.contiguous()
    if b is not None:
        b = b.to(x.dtype).contiguous()
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    m, k = x.shape
    y = torch.empty(m, n, dtype=x.dtype)
    status = fn(
        _CODES[w.dtype],
        w.data_ptr(),
        None if scale is None else scale.data_ptr(),
        _CODES[x.dtype],
        None if b is None else b.data_ptr(),
        x.data_ptr(),
        y.data_ptr(),
        m,
        n,
        k,
        torch.get_num_threads(),
    )
    _check(status, "gemv.c", "a vector unit", "its float32 copy of the activations")  # (never 2: it has a C path)
    return y


def block(*args) -> int:
    """block.c's gpt2load_block (fused.py prepares its arguments): 0, or 1 when out of memory."""
    return _library()[0].gpt2load_block(*args)


@functools.cache
def _attend_built(lib: ctypes.CDLL) -> bool:
    return bool(lib.gpt2load_attend_supported())  # attend.c has a kernel only in AVX-512 builds


def attend_available() -> bool:
    """Whether attend.c may be used here: GPT2LOAD_NATIVE is not 0, the library builds, the CPU has AVX-512."""
    lib = _library()[0]
    return lib is not None and _attend_built(lib)


def attend_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attend` takes these operands: bfloat16 [B, H, T, D] on CPU, D a multiple of 16, the last dimension
    contiguous, at least as many keys as queries, and `attend_available`."""
    return (
        all(t.is_cpu and t.dtype == torch.bfloat16 and t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))
        and q.shape[:2] == k.shape[:2]
        and k.shape == v.shape
        and q.shape[3] == k.shape[3]
        and q.shape[3] > 0
        and q.shape[3] % 16 == 0
        and 0 < q.shape[2] <= k.shape[2]
        and attend_available()
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of q [B, H, Tq, D] over k, v [B, H, Tk, D] (query i sees keys up to i + Tk - Tq) for
    operands `attend_usable` accepted: y [B, Tq, H, D], bfloat16, sums in float32 (attend.c)."""
    B, H, Tq, D = q.shape
    y = torch.empty(B, Tq, H, D, dtype=q.dtype)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    scale = D**-0.5 if scale is None else scale
    fn = _library()[0].gpt2load_attend
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), B, H, Tq, k.shape[2], D, *strides, scale)
    _check(fn(*args, torch.get_num_threads()), "attend.c", "AVX-512", "its repacked keys and values")
    return y


def attend_one_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attend_one` takes these operands: float32 q [B, H, 1, D] and k, v [B, H, Tk, D] on CPU with the
    last dimension contiguous, D a multiple of 16 up to 256, a bool mask [B or 1, H or 1, 1, Tk] (or none) with
    its last dimension contiguous, and `attend_available`."""
    if not (
        all(t.is_cpu and t.dtype == torch.float32 and t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))
        and q.shape[2] == 1
        and q.shape[:2] == k.shape[:2]
        and k.shape == v.shape
        and q.shape[3] == k.shape[3]
        and 0 < q.shape[3] <= 256
        and q.shape[3] % 16 == 0
        and k.shape[2] > 0
    ):
        return False
    if mask is not None:
        B, H, Tk, _ = k.shape
        if not (
            mask.is_cpu
            and mask.dtype == torch.bool
            and mask.dim() == 4
            and mask.shape[0] in (1, B)
            and mask.shape[1] in (1, H)
            and mask.shape[2:] == (1, Tk)
            and (mask.stride(3) == 1 or Tk == 1)
        ):
            return False
    return attend_available()


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one float32 query per row and head, q [B, H, 1, D], over k, v [B, H, Tk, D], seeing the keys
    where `mask` is True (all when None), for operands `attend_one_usable` accepted: y [B, 1, H, D] (attend.c)."""
    B, H, _, D = q.shape
    y = torch.empty(B, 1, H, D, dtype=q.dtype)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    if mask is not None:
        ms = (ctypes.c_int64 * 2)(*(mask.stride(i) if mask.shape[i] > 1 else 0 for i in (0, 1)))
        mask_ptr = mask.data_ptr()
    else:
        ms, mask_ptr = (ctypes.c_int64 * 2)(0, 0), None
    fn = _library()[0].gpt2load_attend_one
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), mask_ptr, y.data_ptr(), B, H, k.shape[2], D, *strides, ms)
    _check(fn(*args, D**-0.5, torch.get_num_threads()), "attend.c", "AVX-512", "its scores")
    return y
