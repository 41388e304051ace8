"""The backend a GPTModel is handed for inference (`accelerate`): what its modules call when they may go faster.

A module takes a fast path only when it is exactly gpt2load's (or torch's) class, no hook is registered on it
(or globally), and neither autograd nor dropout needs to see its operations: a user's LoRA wrapper, subclass,
replaced head or hook is called as it is. Each hook returns None when it does not apply, and the module then
runs its own plain code; the model's forward stays the book's.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..model.gpt import (
    GELU,
    FeedForward,
    GPTModel,
    KVCache,
    LayerNorm,
    MultiHeadAttention,
    TransformerBlock,
    set_backend,
)
from ..model.quant import Int8Linear
from ..settings import KernelSettings
from .fused import FusedBlocks, allowed
from .kernels import Stacked
from .registry import Kernels, shared_kernels


def _no_global_hooks() -> bool:
    return not (
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or getattr(_module, "_global_forward_hooks_always_called", None)
    )


def is_stock(modules, types) -> bool:
    """True when each module is exactly of its type (not a subclass, not a replacement) and no forward hook is
    registered on it or globally. (Backward hooks do not matter: fast paths run only without autograd.)"""
    for m, cls in zip(modules, types, strict=True):
        if type(m) is not cls or m._forward_hooks or m._forward_pre_hooks:
            return False
    return _no_global_hooks()


def fast_enabled(module: nn.Module) -> bool:
    """Fast paths are for inference: autograd and dropout must see the modules' own operations."""
    return not torch.is_grad_enabled() and not module.training


_FF_STOCK = (nn.Sequential, nn.Linear, GELU, nn.Linear)
_BLOCK_STOCK = (LayerNorm, MultiHeadAttention, FeedForward, LayerNorm, nn.Dropout)


class Backend:
    """Fused q/k/v weights, measured kernels and attention for a model's stock modules, through `kernels`."""

    def __init__(self, kernels: Kernels) -> None:
        self.kernels = kernels
        # q/k/v as one matrix per attention module (and its bias, and int8 scales), rebuilt when a part changes
        self._fused: weakref.WeakKeyDictionary[nn.Module, tuple[Stacked, Stacked, Stacked]] = (
            weakref.WeakKeyDictionary()
        )
        self.blocks = FusedBlocks() if allowed(kernels.settings) else None  # a decoding step's block in one call

    def __reduce__(self):  # a pickled model comes back with a backend of the same settings
        return (Backend, (self.kernels,))

    def __deepcopy__(self, memo: dict) -> Backend:  # copies of a model share one backend
        return self

    def forget(self, model: nn.Module) -> None:
        """Drop the fused weights of `model`'s modules (they are about to change kind, as in quantization)."""
        for m in model.modules():
            self._fused.pop(m, None)

    def embed(self, model: GPTModel, in_idx: torch.Tensor, start: int, pos_ids: torch.Tensor | None):
        m = model._modules
        if not (fast_enabled(model) and is_stock((m["pos_emb"], m["drop_emb"]), (nn.Embedding, nn.Dropout))):
            return None
        if m["drop_emb"].training:
            return None
        # consecutive positions are a slice of the table; no dropout at inference
        T = in_idx.shape[1]
        pos = m["pos_emb"].weight[start : start + T] if pos_ids is None else m["pos_emb"].forward(pos_ids)
        return m["tok_emb"](in_idx) + pos

    def block(
        self,
        block: TransformerBlock,
        x: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        attn_mask: torch.Tensor | None,
        last_only: bool,
    ):
        m = block._modules  # (attribute lookups through nn.Module.__getattr__ cost more)
        kids = (m["norm1"], m["att"], m["ff"], m["norm2"], m["drop_shortcut"])
        if not (fast_enabled(block) and not kids[-1].training and is_stock(kids, _BLOCK_STOCK)):
            return None
        if x.shape[1] == 1 and cache is not None and self.blocks is not None:
            y = self.blocks.step(block, x, cache, layer, attn_mask, lambda: self._stacked_qkv(kids[1]))
            if y is not None:
                return y
        # Stock children without hooks, no dropout at inference: their forwards directly, without the module-call
        # machinery (a few microseconds each, a tenth of a decoding step over all layers).
        h = kids[1].forward(kids[0].forward(x), cache, layer, attn_mask, last_only)
        x = (x if h.shape[1] == x.shape[1] else x[:, -h.shape[1] :]) + h
        return x + kids[2].forward(kids[3].forward(x))

    def _stacked_qkv(self, att: MultiHeadAttention):
        """The attention's q/k/v weights stacked into one [3d, d] matrix, with their bias and (int8) scales stacked
        too (None where absent), when its three linears are stock modules of one kind; else None."""
        m = att._modules
        lins = (m["W_query"], m["W_key"], m["W_value"])
        kind = type(lins[0])
        if kind not in (nn.Linear, Int8Linear) or not is_stock(lins, (kind, kind, kind)):
            return None
        biases = [lin.bias for lin in lins]
        if len({b is None for b in biases}) != 1:
            return None
        fused = self._fused.get(att)
        if fused is None:
            fused = self._fused[att] = (Stacked(), Stacked(), Stacked())
        weight, bias, scale = fused
        b = None if biases[0] is None else bias.get(biases)
        if kind is Int8Linear:
            return weight.get([lin.qweight for lin in lins]), b, scale.get([lin.weight_scale for lin in lins])
        return weight.get([lin.weight for lin in lins]), b, None

    def qkv(self, att: MultiHeadAttention, x: torch.Tensor):
        if not fast_enabled(att):
            return None
        stacked = self._stacked_qkv(att)
        if stacked is None:
            return None
        # One matmul reads all three weights: for one token, as fast as reading one of them.
        w, b, scale = stacked
        y = self.kernels.linear(x, w, b) if scale is None else self.kernels.int8_linear(x, w, scale, b)
        B, T, _ = x.shape
        return y.view(B, T, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, att: MultiHeadAttention, q, k, v, mask):
        return self.kernels.attention(q, k, v, mask) if fast_enabled(att) else None

    def linear(self, owner: nn.Module, lin: nn.Module, x: torch.Tensor):
        """`lin(x)` by a measured kernel, for a stock nn.Linear (the attention's projection, the head)."""
        if fast_enabled(owner) and is_stock((lin,), (nn.Linear,)):
            return self.kernels.linear(x, lin.weight, lin.bias)
        return None

    def feed_forward(self, ff: FeedForward, x: torch.Tensor):
        seq = ff._modules["layers"]
        parts = tuple(seq._modules.values()) if type(seq) is nn.Sequential else ()
        if len(parts) == 3 and fast_enabled(ff) and is_stock((seq, *parts), _FF_STOCK):
            fc1, _, fc2 = parts  # one kernel: the first matmul and its GELU
            linear = self.kernels.linear
            return linear(linear(x, fc1.weight, fc1.bias, gelu=True), fc2.weight, fc2.bias)
        return None

    def int8_linear(self, lin: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.int8_linear(x, lin.qweight, lin.weight_scale, lin.bias)


def accelerate(model: nn.Module, kernels: Kernels | KernelSettings | None = None) -> nn.Module:
    """Hand `model` (a GPTModel, or any module holding gpt2load's) a backend: its stock modules then compute by
    `kernels` at inference (a Kernels, or the settings of the process's shared one; default: default settings).
    Returns the model; `plain(model)` takes the backend off again."""
    if not isinstance(kernels, Kernels):
        kernels = shared_kernels(kernels or KernelSettings())
    return set_backend(model, Backend(kernels))


def plain(model: nn.Module) -> nn.Module:
    """Take the backend off: every module computes as the book's code does. Returns the model."""
    return set_backend(model, None)


__all__ = ["Backend", "accelerate", "fast_enabled", "is_stock", "plain", "set_backend"]
