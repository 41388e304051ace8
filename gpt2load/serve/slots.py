"""The keys and values of the sequences decoding together: one row each, left-aligned, of one shared cache."""

from __future__ import annotations

import torch

from ..model.gpt import GPTModel, KVCache


class SlotCache:
    """Keys and values of up to `rows` sequences of different lengths, one per row, each left-aligned.

    It stands in for a KVCache in `model(..., cache=...)` during a decode step: `update` writes each row's one
    new key/value at that row's length and returns the columns every row of the step may need.
    """

    def __init__(self, model: GPTModel, rows: int) -> None:
        cfg, w = model.cfg, model.pos_emb.weight  # device and float dtype (tok_emb may be int8)
        self.shape = (rows, cfg.n_heads, 0, cfg.emb_dim // cfg.n_heads)
        self.n_layers, self.limit, self.device, self.dtype = cfg.n_layers, cfg.context_length, w.device, w.dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lens = torch.zeros(rows, dtype=torch.long, device=w.device)
        self.batch, self.width, self.pos = 0, 0, 0
        self._grow(64)

    def _grow(self, width: int) -> None:
        """Room for `width` positions per row. Zeros, not empty: masked columns must hold finite numbers, since
        attention multiplies their (zero) weights with them."""
        cap = self.k[0].shape[2] if self.k else 0
        if width <= cap:
            return
        new = min(self.limit, max(width, 2 * cap))
        shape = (*self.shape[:2], new, self.shape[3])
        for cache in (self.k, self.v):
            for i in range(self.n_layers):
                t = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if i < len(cache):
                    t[:, :, :cap] = cache[i]
                    cache[i] = t
                else:
                    cache.append(t)

    def put(self, row: int, kv: KVCache, length: int) -> None:
        """Copy a sequence's encoded prompt (row 0 of `kv`) into `row`."""
        self._grow(length + 1)
        for mine, theirs in ((self.k, kv.k), (self.v, kv.v)):
            for i in range(self.n_layers):
                mine[i][row, :, :length] = theirs[i][0, :, :length]
        self.lens[row] = length

    def move(self, src: int, dst: int) -> None:
        """Row `src` takes the place of row `dst` (which has left)."""
        width = int(self.lens[src])
        for cache in (self.k, self.v):
            for t in cache:
                t[dst, :, :width] = t[src, :, :width]
        self.lens[dst] = self.lens[src]

    def begin(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a step over rows [0, batch): (attn_mask [B, 1, 1, W], pos_ids [B, 1]) for the forward."""
        lens = self.lens[:batch]
        self.batch, self.width = batch, int(lens.max()) + 1
        self._grow(self.width)
        mask = torch.arange(self.width, device=self.device)[None, :] <= lens[:, None]
        return mask[:, None, None, :], lens[:, None].clone()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's key/value [B, H, 1, hd] of each row at its length; return [B, H, W, hd] each."""
        rows = torch.arange(self.batch, device=self.device)
        cols = self.lens[: self.batch]
        self.k[layer][rows, :, cols] = k[:, :, 0]
        self.v[layer][rows, :, cols] = v[:, :, 0]
        return self.k[layer][: self.batch, :, : self.width], self.v[layer][: self.batch, :, : self.width]

    def end(self) -> None:
        self.lens[: self.batch] += 1
