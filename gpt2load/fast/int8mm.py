"""int8 weight-only matmuls: torch's int8 kernel or gpt2load's own (gemv.c), chosen by measuring per shape."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2load.fast import native
from gpt2load.fast.kernels import SETTINGS, calibrated, matmul_setting


@functools.cache
def int8pack_works() -> bool:
    """Whether torch's int8 weight-only matmul exists here and agrees with a dequantized matmul."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 64, generator=gen)
        q = torch.randint(-127, 128, (40, 64), generator=gen, dtype=torch.int8)
        s = torch.rand(40, generator=gen) / 100
        with torch.inference_mode():
            got = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s.bfloat16()).float()
        return torch.allclose(got, x @ (q.float() * s[:, None]).t(), atol=5e-2, rtol=2e-2)
    except (AttributeError, RuntimeError):
        return False


def aligned_int8(q: torch.Tensor) -> torch.Tensor:
    """q itself when the int8 kernel can read it in place (contiguous, 64-byte aligned), else an aligned copy."""
    return q if q.is_contiguous() and q.data_ptr() % 64 == 0 else q.clone(memory_format=torch.contiguous_format)


def _exact(x, q, b, gelu, scale):
    """Dequantized weights through F.linear, in x's dtype: exact, slow (a float copy of the weight per call)."""
    y = F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])
    return y if b is None else y + b.to(x.dtype)


def _int8pack(x, q, b, gelu, scale):
    """torch's int8 weight-only kernel: it computes in bfloat16, so float32 activations are rounded on the way in."""
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale.to(torch.bfloat16)).to(x.dtype)
    return y if b is None else y + b.to(x.dtype)


def _int8native(x, q, b, gelu, scale):
    """gpt2load's own kernel: int8 weights converted to float32 in registers, sums in float32."""
    return native.gemv(x, q, b, scale)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ (q * scale[:, None]).T + b for int8 weights q [out, in] and per-output-channel scales [out].

    On CPU, for up to 16 rows, torch's int8 kernel and gpt2load's own are measured once per shape and the faster
    is used (GPT2LOAD_MATMUL=native forces gpt2load's, any other forced kernel torch's; GPT2LOAD_NATIVE=0 leaves
    torch's); more rows use torch's. GPT2LOAD_INT8PACK=0, a torch without its kernel, or weights not 64-byte
    aligned (`aligned_int8` makes them so) use gpt2load's kernel where it applies, else dequantize the weights and
    multiply in x's dtype (exact, slow).
    """
    flat = x.reshape(-1, x.shape[-1])
    key = (q.shape, flat.shape, x.dtype, x.device, b is None, q.is_contiguous(), q.data_ptr() % 64 == 0)
    key += tuple(os.environ.get(v) for v in (*SETTINGS, "GPT2LOAD_INT8PACK")) + (torch.get_num_threads(),)
    kernel = chosen.get(key)
    if kernel is None:
        if len(chosen) > 4096:  # many shapes (prompts of every length): start over
            chosen.clear()
        kernel = chosen[key] = _choose(flat, q, scale, b)
    return kernel(flat, q, b, False, scale).view(*x.shape[:-1], q.shape[0])


chosen: dict[tuple, Callable] = {}  # `int8_linear`'s kernel per shape and setting


def _choose(flat: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None) -> Callable:
    # torch's kernel reads the weights with aligned vector loads for 4+ rows: misaligned memory would crash it.
    pack = (
        flat.device.type == "cpu"
        and q.is_contiguous()
        and q.data_ptr() % 64 == 0
        and os.environ.get("GPT2LOAD_INT8PACK", "1").strip() != "0"
        and int8pack_works()
    )
    setting = matmul_setting()
    own = setting in ("auto", "no-onednn", "native") and native.usable(flat, q)
    if own and pack and setting != "native":
        return calibrated(flat, q, b, False, (_int8pack, _int8native), (scale,), ref=_exact)
    return _int8native if own else _int8pack if pack else _exact
