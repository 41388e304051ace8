"""GPTModel in the layout and names of "Build a Large Language Model (From Scratch)", with a KV cache.

`GPTModel.forward` is the one forward pass: training, evaluation and every decoder call it. The model imports
nothing from the speed layer: a model handed a backend (`gpt2load.fast.accelerate`, which `load_gpt2` does) lets
its modules ask it for a faster way (one fused q/k/v matmul, a measured matmul kernel, gpt2load's attention);
the backend answers only for stock modules without hooks, so replaced modules and hooks are honoured, and a
module it does not answer for runs the plain code below.
A state_dict of this model loads into the book's chapter-4 GPTModel (export_pth adds the book's mask buffers).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Gpt2LoadError
from .config import GPTConfig
from .kvcache import KVCache
from .quant import Int8Embedding, Int8Linear

# What a module asks its backend (gpt2load.fast.backend.Backend); each answer is None when the fast way does not
# apply. Typed loosely on purpose: the model knows the questions, not the speed layer.
Backend = Any


def set_backend(model: nn.Module, backend: Backend | None) -> nn.Module:
    """Hand every module of `model` that asks a backend (a class attribute `backend`) this one; None: none."""
    for m in model.modules():
        if hasattr(type(m), "backend"):
            m.backend = backend
    return model


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


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)  # F.layer_norm's op itself


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    backend: Backend | None = None

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is not None and (y := self.backend.feed_forward(self, x)) is not None:
            return y
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    """The book's causal multi-head attention, with a KV cache, an optional mask and positions to skip.

    The book registers a dense context x context `mask` buffer; this module has none (SDPA masks causally by
    itself), and GPTModel.load_state_dict ignores the book's `mask` entries.
    """

    backend: Backend | None = None

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Attention output [B, T, d_out] (or [B, 1, d_out] for the last position only, with `last_only`)."""
        B, T, _ = x.shape
        be = self.backend
        fused = be.qkv(self, x) if be is not None else None
        if fused is not None:
            q, k, v = fused
        else:
            q, k, v = (
                lin(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                for lin in (self.W_query, self.W_key, self.W_value)
            )  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if last_only and T > 1:  # the other positions are only needed for their keys and values
            q = q[:, :, -1:]
            attn_mask = None if attn_mask is None else attn_mask[..., -1:, :]
        Tq = q.shape[2]
        y = be.attend(self, q, k, v, attn_mask) if be is not None else None
        if y is None:
            y = sdpa_causal(q, k, v, dropout_p=self.dropout.p if self.training else 0.0, mask=attn_mask)
        y = y.reshape(B, Tq, self.d_out)
        out = be.linear(self, self.out_proj, y) if be is not None else None
        return self.out_proj(y) if out is None else out


class TransformerBlock(nn.Module):
    backend: Backend | None = None

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.drop_rate, cfg.n_heads, cfg.qkv_bias
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        if self.backend is not None:
            y = self.backend.block(self, x, cache, layer, attn_mask, last_only)
            if y is not None:
                return y
        h = self.norm1(x)
        # last_only is passed only when used, so a user's attention module with the book's signature still works
        h = self.att(h, cache, layer, attn_mask, last_only=True) if last_only else self.att(h, cache, layer, attn_mask)
        x = x[:, -h.shape[1] :] + self.drop_shortcut(h)
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2 in the book's names. The output head is tied to the token embedding (one Parameter) until
    `untie_head()` or a state whose head differs; `model.out_head` may be replaced by any module."""

    backend: Backend | None = None

    def __init__(self, cfg: GPTConfig | dict) -> None:
        super().__init__()
        if isinstance(cfg, dict):  # the book passes a dict with upper-case keys
            cfg = config_from_book_dict(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.tie_head()

    # -- the head -------------------------------------------------------------------------------------------

    @property
    def head_tied(self) -> bool:
        """True when the output head uses the token embedding's Parameter itself (int8: its int8 matrix)."""
        if isinstance(self.tok_emb, Int8Embedding):
            return getattr(self.out_head, "qweight", None) is self.tok_emb.qweight
        return getattr(self.out_head, "weight", None) is self.tok_emb.weight

    def tie_head(self) -> None:
        """Make the output head use the token embedding's Parameter (one tensor, GPT-2's layout)."""
        emb = self.tok_emb
        if isinstance(emb, Int8Embedding) and isinstance(self.out_head, Int8Linear):
            if tuple(self.out_head.qweight.shape) == tuple(emb.qweight.shape):
                self.out_head.qweight, self.out_head.weight_scale = emb.qweight, emb.weight_scale
                return
        w = getattr(self.out_head, "weight", None)
        if w is None or tuple(w.shape) != (emb.num_embeddings, emb.embedding_dim) or isinstance(emb, Int8Embedding):
            got = "no weight" if w is None else f"a weight of shape {list(w.shape)}"
            raise Gpt2LoadError(
                f"out_head has {got}, so it cannot share tok_emb's [{emb.num_embeddings}, {emb.embedding_dim}] "
                "weight (an int8 embedding shares only with an int8 head)"
            )
        self.out_head.weight = emb.weight

    tie_weights = tie_head  # the name earlier versions used

    def untie_head(self) -> None:
        """Give the output head its own copy of the token embedding (as the book's load_weights_into_gpt does)."""
        if not self.head_tied:
            return
        if isinstance(self.tok_emb, Int8Embedding):
            head = self.out_head
            head.qweight, head.weight_scale = head.qweight.clone(), head.weight_scale.clone()
            return
        w = self.tok_emb.weight
        self.out_head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)

    def head_meta(self) -> dict:
        """What gpt2load's files record about the head: tied or not, its [out, in] shape, whether it has a bias."""
        head = self.out_head
        w, b = getattr(head, "weight", getattr(head, "qweight", None)), getattr(head, "bias", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise Gpt2LoadError(
                f"out_head is a {type(head).__name__} without a [out, in] weight: gpt2load's files hold a linear "
                "head (merge adapters into it first)"
            )
        return {"tied": self.head_tied, "shape": list(w.shape), "bias": isinstance(b, torch.Tensor)}

    def real_config(self) -> GPTConfig:
        """The config with the drop rate the model's dropout modules really use (what exports record)."""
        p = self.drop_emb.p if isinstance(self.drop_emb, nn.Dropout) else self.cfg.drop_rate
        return replace(self.cfg, drop_rate=p)

    def is_derived(self, name: str) -> bool:
        """True for a state_dict entry no file needs to store: the head's weight (int8: and scales) while tied."""
        return name in ("out_head.weight", "out_head.qweight", "out_head.weight_scale") and self.head_tied

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The state_dict without derived entries: what gpt2load's files and checkpoints hold."""
        return {k: v for k, v in self.state_dict().items() if not self.is_derived(k)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's load_state_dict, where the head follows the data and the book's `mask` entries are ignored.

        An `out_head.weight` equal to `tok_emb.weight` loads tied; a different one loads untied (the head
        gets its own Parameter first, so tok_emb is never overwritten); a head of another shape or with a bias
        (a classifier) replaces `out_head` with an nn.Linear of that shape. A state without `out_head.weight`
        (gpt2load's stored form of a tied model) keeps a tied head tied.
        """
        state = {k: v for k, v in state_dict.items() if not k.endswith(".att.mask")}
        if isinstance(self.tok_emb, Int8Embedding):
            return self._load_int8(state, strict, assign)
        head, emb = state.get("out_head.weight"), state.get("tok_emb.weight")
        if head is None and emb is not None and self.head_tied:  # gpt2load's stored form: the tied head once
            state["out_head.weight"] = head = emb
        tie = False
        if head is not None:
            self._fit_head(tuple(head.shape), "out_head.bias" in state)
            tie = emb is not None and head.shape == emb.shape and (head is emb or torch.equal(head, emb))
            if not tie:
                self.untie_head()
        result = super().load_state_dict(state, strict=strict, assign=assign)
        if tie or (head is None and self.head_tied):
            self.tie_head()  # assign=True puts new Parameters in: share the embedding's again
        return result

    def _load_int8(self, state: dict, strict: bool, assign: bool):
        """An int8 model's state: a tied head is stored once, as tok_emb's int8 matrix and scales."""
        tied = self.head_tied
        if tied and "out_head.qweight" not in state:
            for part in ("qweight", "weight_scale"):
                if f"tok_emb.{part}" in state:
                    state[f"out_head.{part}"] = state[f"tok_emb.{part}"]
        result = super().load_state_dict(state, strict=strict, assign=assign)
        if tied and state.get("out_head.qweight") is state.get("tok_emb.qweight"):
            self.tie_head()
        return result

    def _fit_head(self, shape: tuple[int, ...], bias: bool) -> None:
        cur = self.out_head
        if type(cur) is nn.Linear and tuple(cur.weight.shape) == shape and (cur.bias is not None) == bias:
            return
        if len(shape) != 2:
            raise Gpt2LoadError(f"out_head.weight has shape {list(shape)}: a linear head needs [out, in]")
        w = self.tok_emb.weight
        self.out_head = nn.Linear(shape[1], shape[0], bias=bias, device=w.device, dtype=w.dtype)

    # -- the forward pass -----------------------------------------------------------------------------------

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T]: the only forward pass (training and every decoder).

        Args:
            in_idx: token ids.
            cache: a KVCache; the new tokens are appended after `cache.pos` positions.
            attn_mask: bool [B, 1, T, T_total], True where attention is allowed (left-padded batches).
            pos_ids: positions [B, T]; default `cache.pos + arange(T)`.
            last_only: logits of the last position only, [B, 1, vocab] (the last block skips the others).
        """
        B, T = in_idx.shape
        start = cache.pos if cache is not None else 0
        if pos_ids is None and start + T > self.cfg.context_length:
            raise ValueError(f"{start + T} positions exceed the context length {self.cfg.context_length}")
        be = self.backend
        x = be.embed(self, in_idx, start, pos_ids) if be is not None else None
        if x is None:
            if pos_ids is None:
                pos_ids = torch.arange(start, start + T, device=in_idx.device)
            x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos_ids))
        last = len(self.trf_blocks) - 1
        for i, block in enumerate(self.trf_blocks):
            if last_only and i == last:
                x = block(x, cache, i, attn_mask, last_only=True)
            else:
                x = block(x, cache, i, attn_mask)
        if cache is not None:
            cache.pos = start + T
        x = self.final_norm(x[:, -1:] if last_only else x)
        logits = be.linear(self, self.out_head, x) if be is not None else None
        return self.out_head(x) if logits is None else logits

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        w = self.pos_emb.weight  # the model's device and float dtype (tok_emb may be int8)
        return KVCache(self.cfg, batch, max_len or self.cfg.context_length, device=w.device, dtype=w.dtype)


def is_derived(name: str, model: GPTModel | None = None) -> bool:
    """State_dict entries no file needs: the tied head (when `model` is given, only if it is tied) and the
    book's mask buffers."""
    if name.endswith(".att.mask"):
        return True
    return model.is_derived(name) if model is not None else name == "out_head.weight"


def stored_state(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's state_dict without the derived entries: what gpt2load's files and checkpoints hold."""
    return model.stored_state()


def causal_mask(n: int, device=None) -> torch.Tensor:
    """The book's mask: 1.0 above the diagonal (positions to hide), 0.0 elsewhere (for book-layout files)."""
    return torch.triu(torch.ones(n, n, device=device), diagonal=1)


_BOOK_KEYS = {
    "vocab_size": "vocab_size",
    "context_length": "context_length",
    "emb_dim": "emb_dim",
    "n_heads": "n_heads",
    "n_layers": "n_layers",
    "drop_rate": "drop_rate",
    "qkv_bias": "qkv_bias",
}


def config_from_book_dict(d: dict) -> GPTConfig:
    """GPTConfig from the book's GPT_CONFIG_124M-style dict (keys in any case)."""
    lower = {k.lower(): v for k, v in d.items()}
    return GPTConfig(**{ours: lower[k] for k, ours in _BOOK_KEYS.items() if k in lower})


def param_count(model: nn.Module) -> int:
    """Unique parameters (the tied head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "GPTModel",
    "KVCache",
    "causal_mask",
    "is_derived",
    "param_count",
    "sdpa_causal",
    "set_backend",
    "stored_state",
]
