"""The decoders every generation path uses: they call the model itself, one new token per row per step.

Two rules about the context window (`context_size`, default the model's):

* A prompt longer than the window keeps its last `context_size` tokens (the book's `idx[:, -context_size:]`);
  a `PromptTruncatedWarning` says so.
* Decoding past the window slides it: each further token re-encodes the last `context_size` tokens, so the
  output equals the book's loop, which recomputes `idx[:, -context_size:]` at every step.

A gpt2load GPTModel is decoded with a KV cache (`CachedDecoder`); any other model with the book's signature
`logits = model(idx)` is decoded as the book does, recomputing the window at each step (`WindowDecoder`).
Decoding never applies dropout, whatever the model's train/eval mode.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import Gpt2LoadError
from ..model.gpt import GPTModel
from ..tokenizer import EOT_ID


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the context window; only its last `context_size` tokens were used."""


class BookModelWarning(UserWarning):
    """The model is not a gpt2load GPTModel: decoding recomputes the window at every step (no KV cache)."""


_warned_types: set[type] = set()


def caller_level() -> int:
    """The `stacklevel` that makes a warning point at the first caller outside gpt2load and torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("gpt2load", "torch"):
        frame, level = frame.f_back, level + 1
    return level


# ---------------------------------------------------------------------------------------------------------------
# What a model tells about itself (a reader's own GPTModel has no cfg)


def model_context(model: nn.Module) -> int | None:
    """The model's context length, if it can be read off it."""
    if isinstance(model, GPTModel):
        return model.cfg.context_length
    pos = getattr(model, "pos_emb", None)
    return pos.num_embeddings if isinstance(pos, nn.Embedding) else None


def model_vocab(model: nn.Module) -> int | None:
    """The number of token ids the model accepts, if it can be read off it."""
    if isinstance(model, GPTModel):
        return model.cfg.vocab_size
    emb = getattr(model, "tok_emb", None)
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def check_context(model: nn.Module, context_size: int | None) -> int:
    """The window to use: `context_size`, or the model's context length."""
    limit = model_context(model)
    if context_size is None:
        if limit is None:
            raise Gpt2LoadError("the model's context length is unknown: pass context_size (e.g. 1024 for GPT-2)")
        return limit
    whole = isinstance(context_size, int) and not isinstance(context_size, bool)
    if not whole or context_size < 1 or (limit is not None and context_size > limit):
        raise Gpt2LoadError(
            f"context_size must be between 1 and the model's context length {limit}, got {context_size!r}"
        )
    return context_size


def check_prompt(model: nn.Module, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """Raise a Gpt2LoadError unless idx is [batch, tokens] of ids in the model's vocabulary."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        got = f"{idx.dtype} {list(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise Gpt2LoadError(f"idx must be an integer tensor of token ids shaped [batch, tokens], got {got}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise Gpt2LoadError(
            f"idx {list(idx.shape)} is empty: give at least one token per row (e.g. {EOT_ID} for <|endoftext|>)"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
            raise Gpt2LoadError(f"attention_mask must be a tensor shaped like idx {list(idx.shape)}")
        m = attention_mask.long()
        if not bool(((m == 0) | (m == 1)).all()) or not bool((m.diff(dim=1) >= 0).all()) or not bool(m[:, -1].all()):
            raise Gpt2LoadError("attention_mask must be left padding: per row, 0s then at least one 1 (see left_pad)")
    vocab = model_vocab(model)
    outside = (idx < 0) | (idx >= vocab) if vocab is not None else idx < 0
    if attention_mask is not None:
        outside &= attention_mask.bool()  # padding may use any id
    if bool(outside.any()):
        raise Gpt2LoadError(
            f"token id {int(idx[outside][0])} is outside the model's vocabulary of {vocab} tokens: "
            "use a tokenizer that matches the model"
        )


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = EOT_ID, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths as (idx [B, T], attention_mask [B, T]), padded on the left."""
    width = max((len(p) for p in prompts), default=0)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        if len(p):
            idx[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return idx, mask


@contextmanager
def inference(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """No gradients and no dropout for the duration; the modules' train/eval modes are restored after.
    `modules`: `list(model.modules())` when the caller holds it (a decoder, once per generation, not per step)."""
    modes = [(m, True) for m in (model.modules() if modules is None else modules) if m.training]
    try:
        if modes:  # model.eval() walks every module with Python calls: skip it when all are in eval mode
            model.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


# ---------------------------------------------------------------------------------------------------------------
# Decoders


class _Rows:
    """The token rows decoded so far, in a buffer that grows with use (never sized by max_new_tokens)."""

    def __init__(self, model: nn.Module, idx: torch.Tensor, context_size: int | None) -> None:
        self.model = model
        self.modules = list(model.modules())  # walked at each step for train/eval modes: listed once
        self.window = check_context(model, context_size)
        self.seq = idx.clone()
        self.length = idx.shape[1]  # columns of `seq` filled
        self.logits = torch.empty(0)

    def _append(self, tokens: torch.Tensor) -> None:
        if self.length == self.seq.shape[1]:  # full: double (amortised O(1) per token)
            self.seq = torch.cat((self.seq, torch.zeros_like(self.seq)), 1)
        self.seq[:, self.length] = tokens
        self.length += 1

    def _warn_if_truncated(self, real: int) -> None:
        if real > self.window:
            warnings.warn(
                f"the prompt has {real} tokens but the context holds {self.window}: using its last "
                f"{self.window} tokens",
                PromptTruncatedWarning,
                stacklevel=caller_level(),
            )

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search): rows may be repeated or dropped."""
        self.seq = self.seq.index_select(0, index)
        self.logits = self.logits.index_select(0, index)


class WindowDecoder(_Rows):
    """The book's loop for a model with only `logits = model(idx)`: each step recomputes the last window."""

    def __init__(self, model: nn.Module, idx: torch.Tensor, context_size: int | None = None) -> None:
        super().__init__(model, idx, context_size)
        self._warn_if_truncated(idx.shape[1])
        self.logits = self._run()

    def _run(self) -> torch.Tensor:
        with inference(self.model, self.modules):
            out = self.model(self.seq[:, max(0, self.length - self.window) : self.length])
        return out[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row [N]; return the next-token logits [N, vocab]."""
        self._append(tokens)
        self.logits = self._run()
        return self.logits


class CachedDecoder(_Rows):
    """Feeds a batch of rows to a GPTModel one token at a time, with a KV cache and a sliding window.

    `logits` always holds the next-token logits [N, vocab] of every row. Rows may be left-padded
    (`attention_mask` 0 on the left): pads are masked out and each row's positions start at its first token,
    so a row decodes exactly as it would alone.
    """

    def __init__(
        self,
        model: GPTModel,
        idx: torch.Tensor,
        max_new_tokens: int,
        context_size: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, idx, context_size)
        N, P = idx.shape
        self.keep: torch.Tensor | None = None  # bool [N, columns]: False for left padding
        real = P
        if attention_mask is not None and not bool(attention_mask.all()):
            self.keep = attention_mask.bool().clone()
            self.seq.masked_fill_(~self.keep, 0)  # pads are masked out, but must be valid ids
            real = int(attention_mask.sum(1).max())
        self._warn_if_truncated(real)
        kept = min(P, self.window)
        self.cache = model.new_cache(N, min(self.window, kept + max_new_tokens))
        self.npos = None  # per-row position of the next token, when rows are padded
        self.logits = self._encode(P - kept)

    def _call(self, chunk: torch.Tensor, **kw) -> torch.Tensor:
        with inference(self.model, self.modules):
            out = self.model(chunk, cache=self.cache, last_only=True, **kw)
        return out[:, -1].float()

    def _encode(self, start: int) -> torch.Tensor:
        """(Re)build the cache from columns [start, length) and return the last logits."""
        self.start = start
        self.cache.crop(0)
        chunk = self.seq[:, start : self.length]
        if self.keep is not None and bool(self.keep[:, start:].all()):
            self.keep = None  # the padding has slid out of the window for good
        if self.keep is None:
            self.logits = self._call(chunk)
            return self.logits
        real = self.keep[:, start : self.length]
        T = real.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=real.device)  # pads see themselves: no all-masked rows (NaN)
        mask = (causal & real[:, None, :]) | eye
        pos_ids = (real.cumsum(1) - 1).clamp(min=0)
        self.npos = real.sum(1)
        self.logits = self._call(chunk, attn_mask=mask[:, None], pos_ids=pos_ids)
        return self.logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row [N]; return the next-token logits [N, vocab]."""
        self._append(tokens)
        if self.keep is not None and self.keep.shape[1] < self.seq.shape[1]:  # grown with seq; new columns are real
            self.keep = torch.cat(
                (self.keep, self.keep.new_ones(self.keep.shape[0], self.seq.shape[1] - self.keep.shape[1])), 1
            )
        if self.length - self.start > self.cache.max_len:  # the window is full: slide it
            return self._encode(self.length - self.window)
        if self.keep is None:
            self.logits = self._call(tokens[:, None])
        else:
            mask = self.keep[:, None, None, self.start : self.length]
            self.logits = self._call(tokens[:, None], attn_mask=mask, pos_ids=self.npos[:, None])
            self.npos = self.npos + 1
        return self.logits

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self.keep is not None:
            self.keep = self.keep.index_select(0, index)
            self.npos = self.npos.index_select(0, index)
        self.cache.reorder(index)


def make_decoder(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> CachedDecoder | WindowDecoder:
    """A CachedDecoder for a gpt2load GPTModel; the book's recomputing loop (with a warning, once per model
    class) for any other model called as `logits = model(idx)`."""
    if isinstance(model, GPTModel):
        return CachedDecoder(model, idx, max_new_tokens, context_size, attention_mask)
    if attention_mask is not None and not bool(attention_mask.all()):
        raise Gpt2LoadError(
            f"left-padded batches need a gpt2load GPTModel (positions and masks); {type(model).__name__} "
            "takes only token ids: decode its prompts one at a time"
        )
    if type(model) not in _warned_types:
        _warned_types.add(type(model))
        warnings.warn(
            f"{type(model).__name__} is not a gpt2load GPTModel: decoding calls it on the whole window at "
            "every step, as the book's loop does (no KV cache; slower)",
            BookModelWarning,
            stacklevel=caller_level(),
        )
    return WindowDecoder(model, idx, context_size)


__all__ = [
    "BookModelWarning",
    "CachedDecoder",
    "PromptTruncatedWarning",
    "WindowDecoder",
    "check_context",
    "check_prompt",
    "left_pad",
    "make_decoder",
]
