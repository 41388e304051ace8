"""GPTModel in the layout and names of "Build a Large Language Model (From Scratch)", with a KV cache.

A state_dict of this model loads with strict=True into the book's chapter-4 GPTModel (qkv_bias=True) and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig


class KVCache:
    """Preallocated keys and values for every layer: [B, n_heads, max_len, head_dim] each."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device=None, dtype=None) -> None:
        hd = cfg.emb_dim // cfg.n_heads
        shape = (batch, cfg.n_heads, max_len, hd)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions filled (the same for every layer once a forward pass is done)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, hd] at the current position; return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search), in place of the old rows."""
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                cache[i] = t.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions."""
        self.pos = min(self.pos, length)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiHeadAttention(nn.Module):
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
        # The book registers the causal mask as a persistent float buffer; we keep it so state_dicts match,
        # but attention uses SDPA's own causal masking.
        self.register_buffer("mask", causal_mask(context_length))

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (
            w(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
            for w in (self.W_query, self.W_key, self.W_value)
        )
        if cache is not None:
            k, v = cache.update(layer, k, v)
        p = self.dropout.p if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # one new token sees everything
        elif k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # a chunk appended after cached positions: causal with an offset
            offset = k.shape[2] - T
            allowed = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.d_out))


class TransformerBlock(nn.Module):
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
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer, attn_mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2 in the book's names; the output head shares its weight with `tok_emb` (one Parameter)."""

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
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the output head use the token embedding's Parameter (again, after an assign-load)."""
        self.out_head.weight = self.tok_emb.weight

    def reset_masks(self) -> None:
        """(Re)build the causal mask buffers on the model's device, e.g. after building on 'meta'."""
        device = self.tok_emb.weight.device
        mask = causal_mask(self.cfg.context_length, device=device)
        for block in self.trf_blocks:
            block.att.mask = mask  # one tensor shared by every layer: 4 MB, not 4 MB per layer

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T].

        Args:
            in_idx: token ids.
            cache: a KVCache; the new tokens are appended after `cache.pos` positions.
            attn_mask: bool [B, 1, T, T_total], True where attention is allowed (left-padded batches).
            pos_ids: positions [B, T]; default `cache.pos + arange(T)`.
        """
        B, T = in_idx.shape
        start = cache.pos if cache is not None else 0
        if pos_ids is None:
            if start + T > self.cfg.context_length:
                raise ValueError(f"{start + T} positions exceed the context length {self.cfg.context_length}")
            pos = self.pos_emb.weight[start : start + T]
        else:
            pos = self.pos_emb(pos_ids)
        x = self.drop_emb(self.tok_emb(in_idx) + pos)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, cache, i, attn_mask)
        if cache is not None:
            cache.pos = start + T
        return self.out_head(self.final_norm(x))

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        w = self.tok_emb.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.context_length, device=w.device, dtype=w.dtype)


def is_derived(name: str) -> bool:
    """State_dict entries no file needs to store: the tied head (it is tok_emb) and the rebuilt masks."""
    return name == "out_head.weight" or name.endswith(".att.mask")


def stored_state(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's state_dict without the derived entries: what gpt2load's files and checkpoints hold."""
    tied = model.out_head.weight is model.tok_emb.weight
    return {k: v for k, v in model.state_dict().items() if not is_derived(k) or (k == "out_head.weight" and not tied)}


def causal_mask(n: int, device=None) -> torch.Tensor:
    """The book's mask: 1.0 above the diagonal (positions to hide), 0.0 elsewhere."""
    ones = torch.ones(n, n, device=device)
    if ones.is_meta:  # triu on 'meta' costs a second of one-time setup; reset_masks() fills it in later
        return ones
    return torch.triu(ones, diagonal=1)


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


__all__ = ["GPTModel", "KVCache", "causal_mask", "param_count"]
