"""The KV cache: keys and values of every layer, preallocated, appended to at each forward pass."""

from __future__ import annotations

import torch

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
        """Keep batch rows `index` (beam search), in place of the old rows.

        With as many rows as before, only the rows that change and only the positions filled so far are copied,
        into the same buffers (a beam that continues itself costs nothing); a new row count reallocates."""
        n = self.k[0].shape[0] if self.k else 0
        if index.shape[0] != n:
            for cache in (self.k, self.v):
                for i, t in enumerate(cache):
                    cache[i] = t.index_select(0, index)
            return
        moved = (index != torch.arange(n, device=index.device)).nonzero().flatten()
        if moved.numel() == 0:
            return
        src, end = index[moved], self.pos
        for cache in (self.k, self.v):
            for t in cache:
                t[moved, :, :end] = t[src, :, :end]  # the right side is gathered first: swapped rows are safe

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions."""
        self.pos = min(self.pos, length)


__all__ = ["KVCache"]
