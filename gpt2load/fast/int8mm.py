"""int8 weight-only matmuls: torch's int8 kernel, gpt2load's own (gemv.c) and the exact dequantized product, each
called `k(x, q, b, gelu, scale)`; `Kernels.int8_linear` (registry.py) chooses between them per shape."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import native


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


def exact(x, q, b, gelu, scale):
    """Dequantized weights through F.linear, in x's dtype: exact, slow (a float copy of the weight per call)."""
    y = F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])
    return y if b is None else y + b.to(x.dtype)


def int8pack(x, q, b, gelu, scale):
    """torch's int8 weight-only kernel: it computes in bfloat16, so float32 activations are rounded on the way in."""
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale.to(torch.bfloat16)).to(x.dtype)
    return y if b is None else y + b.to(x.dtype)


def int8native(x, q, b, gelu, scale):
    """gpt2load's own kernel: int8 weights converted to float32 in registers, sums in float32."""
    return native.gemv(x, q, b, scale)
