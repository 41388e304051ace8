"""A decoding step's transformer block in one call of gpt2load's block.c: both LayerNorms, the four matmuls, the
new keys and values into the cache, attention, GELU and both residuals.

Why: one new token of a small model is a few dozen matrix-vector products of well under a millisecond each. As
separate operations each pays torch's dispatch and an OpenMP fork and join, and the Python between them leaves the
other core idle; in one call the threads meet at six barriers per block. Used for up to 16 rows of one token each
(greedy or sampled decoding, beams, a batch) over float32, bfloat16 or int8 weights, when every module of the
block is gpt2load's own without hooks (`Backend.block` checks that) and the cache is a `KVCache`; anything else
runs the modules one by one. `GPT2LOAD_BLOCK=0` turns it off.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..model.gpt import KVCache, TransformerBlock
from ..model.quant import Int8Linear
from ..settings import KernelSettings
from . import native

MAX_ROWS = 16
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


class _Params(ctypes.Structure):
    """block.c's `block_params`."""

    _fields_ = [
        ("d", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("hd", ctypes.c_int64),
        ("ff", ctypes.c_int64),
        ("wt", ctypes.c_int64),
        ("eps1", ctypes.c_float),
        ("eps2", ctypes.c_float),
        ("ln1_w", ctypes.c_void_p),
        ("ln1_b", ctypes.c_void_p),
        ("ln2_w", ctypes.c_void_p),
        ("ln2_b", ctypes.c_void_p),
        ("w", ctypes.c_void_p * 4),
        ("scale", ctypes.c_void_p * 4),
        ("bias", ctypes.c_void_p * 4),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 contiguous tensor with t's values (t itself when it is one)."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _linears(block: TransformerBlock) -> list[nn.Module] | None:
    """The block's six linear modules (q, k, v, projection, fc1, fc2) when they are all stock nn.Linear or all
    Int8Linear without hooks, and the feed-forward is gpt2load's Linear-GELU-Linear; else None."""
    att, ff = block._modules["att"], block._modules["ff"]
    seq = ff._modules.get("layers")
    if type(seq) is not nn.Sequential or len(seq) != 3:
        return None
    fc1, act, fc2 = seq._modules.values()
    am = att._modules
    lins = [am["W_query"], am["W_key"], am["W_value"], am["out_proj"], fc1, fc2]
    kind = type(lins[0])
    if kind not in (nn.Linear, Int8Linear) or type(act).__name__ != "GELU" or act._forward_hooks:
        return None
    if any(type(m) is not kind or m._forward_hooks or m._forward_pre_hooks for m in lins):
        return None
    if seq._forward_hooks or seq._forward_pre_hooks or act._forward_pre_hooks:
        return None
    return lins


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: it cannot change in place outside inference mode
        return -1


class _Prepared:
    """block.c's parameters for one block, the tensors they point into (kept alive here), and the module tensors
    they were made from with their data pointers and versions then."""

    def __init__(
        self, params: _Params, keep: list, modules: list[nn.Module], sources: list[torch.Tensor], dtype: torch.dtype
    ) -> None:
        self.params, self.keep, self.modules, self.sources, self.dtype = params, keep, modules, sources, dtype
        self.versions = [(t.data_ptr(), _version(t)) for t in sources]


def allowed(settings: KernelSettings) -> bool:
    """Whether these settings let a block run as one call (not when a matmul or torch's attention is forced)."""
    return (
        settings.block != "0"
        and settings.native != "0"
        and settings.matmul_mode in ("auto", "no-onednn", "native")
        and settings.attention != "sdpa"
    )


class FusedBlocks:
    """The prepared parameters of each block that has been run, rebuilt when one of its tensors changes."""

    def __init__(self) -> None:
        self._prepared: weakref.WeakKeyDictionary[nn.Module, _Prepared] = weakref.WeakKeyDictionary()
        self.calls = 0  # blocks computed by block.c (for tests)
        self._arrays: dict[tuple, ctypes.Array] = {}  # strides as C arrays (the same few at every step)

    def _int64s(self, values: tuple) -> ctypes.Array:
        arr = self._arrays.get(values)
        if arr is None:
            if len(self._arrays) > 256:
                self._arrays.clear()
            arr = self._arrays[values] = (ctypes.c_int64 * len(values))(*values)
        return arr

    def step(
        self,
        block: TransformerBlock,
        x: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None,
        qkv: Callable[[], tuple | None],
    ) -> torch.Tensor | None:
        """The block's output for x [B, 1, d] (one new token per row) when block.c applies, else None. `qkv()`:
        the stacked q/k/v weight, bias and int8 scales the backend holds for this block's attention (asked only
        when the parameters are built)."""
        B, T, d = x.shape
        if T != 1 or B > MAX_ROWS or type(cache) is not KVCache:
            return None
        if x.dtype not in (torch.float32, torch.bfloat16) or not x.is_cpu or not native.available():
            return None
        att = block._modules["att"]
        H, hd = att.num_heads, att.head_dim
        k, v = cache.k[layer], cache.v[layer]
        pos = cache.pos
        if not (
            k.dtype is x.dtype
            and v.dtype is x.dtype
            and k.dim() == 4
            and k.shape == v.shape
            and k.stride() == v.stride()
            and tuple(k.shape[:2]) == (B, H)
            and k.shape[3] == hd
            and k.stride(3) == 1
            and pos < k.shape[2]
            and H * hd == d
        ):
            return None
        if mask is not None:
            if not (
                mask.dtype is torch.bool
                and mask.dim() == 4
                and mask.shape[0] in (1, B)
                and mask.shape[1] in (1, H)
                and tuple(mask.shape[2:]) == (1, pos + 1)
                and (mask.stride(3) == 1 or pos == 0)
                and mask.is_cpu
            ):
                return None
        prepared = self._prepare(block, qkv, x.dtype)
        if prepared is None:
            return None
        x = x.contiguous()
        y = torch.empty_like(x)
        strides = self._int64s(k.stride()[:3])
        if mask is not None:
            ms = self._int64s(tuple(mask.stride(i) if mask.shape[i] > 1 else 0 for i in (0, 1)))
            mask_ptr = mask.data_ptr()
        else:
            ms, mask_ptr = None, None
        status = native.block(
            ctypes.byref(prepared.params),
            _CODES[x.dtype],
            x.data_ptr(),
            y.data_ptr(),
            B,
            k.data_ptr(),
            v.data_ptr(),
            strides,
            pos,
            mask_ptr,
            ms,
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError("block.c could not allocate its activations")
        self.calls += 1
        return y

    def _prepare(self, block: TransformerBlock, qkv: tuple | None, dtype: torch.dtype) -> _Prepared | None:
        """The block's parameters for block.c, reused while every module tensor is the same object with the same
        data and version (checked at each call: a step between two generations may have trained the weights)."""
        lins = _linears(block)  # (hooks or replaced modules since the last call: the modules run as they are)
        if lins is None:
            return None
        got = self._prepared.get(block)
        if got is not None and got.dtype is dtype and all(a is b for a, b in zip(lins, got.modules, strict=True)):
            try:
                if [(t.data_ptr(), t._version) for t in got.sources] == got.versions:
                    return got
            except RuntimeError:  # inference tensors have no version: they cannot have changed in place
                if [t.data_ptr() for t in got.sources] == [p for p, _ in got.versions]:
                    return got
        int8 = type(lins[0]) is Int8Linear
        stacked = qkv()
        if stacked is None:
            return None
        w_qkv, b_qkv, s_qkv = stacked
        weights = [w_qkv] + [m.qweight if int8 else m.weight for m in lins[3:]]
        scales = [s_qkv] + [m.weight_scale for m in lins[3:]] if int8 else [None] * 4
        biases = [b_qkv] + [m.bias for m in lins[3:]]
        norms = [block._modules["norm1"], block._modules["norm2"]]
        small = [t for n in norms for t in (n.scale, n.shift)]
        wdt = weights[0].dtype
        if any(w.dtype is not wdt or not w.is_contiguous() or not w.is_cpu for w in weights) or wdt not in _CODES:
            return None
        if not int8 and wdt is not dtype:  # float weights: the model's own dtype
            return None
        att = block._modules["att"]
        d, ff = att.d_out, lins[4].out_features if int8 else lins[4].weight.shape[0]
        if weights[0].shape != (3 * d, d) or weights[2].shape != (ff, d) or weights[3].shape != (d, ff):
            return None
        small32 = [_f32(t) for t in small]
        biases32 = [_f32(b) for b in biases]
        scales32 = [_f32(s) for s in scales]
        p = _Params()
        p.d, p.heads, p.hd, p.ff, p.wt = d, att.num_heads, att.head_dim, ff, _CODES[wdt]
        p.eps1, p.eps2 = norms[0].eps, norms[1].eps
        p.ln1_w, p.ln1_b, p.ln2_w, p.ln2_b = (_ptr(t) for t in small32)
        for i in range(4):
            p.w[i], p.scale[i], p.bias[i] = _ptr(weights[i]), _ptr(scales32[i]), _ptr(biases32[i])
        # what the parameters were made from: every tensor of the block's modules
        parts = ("qweight", "weight_scale", "bias") if int8 else ("weight", "bias")
        sources = [t for m in lins for t in (getattr(m, n) for n in parts) if t is not None] + small
        got = self._prepared[block] = _Prepared(p, [*weights, *small32, *biases32, *scales32], lins, sources, dtype)
        return got


__all__ = ["FusedBlocks", "allowed"]
