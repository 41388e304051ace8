"""Text generation with a KV cache: the book's `generate`, streaming, batched prompts, and `complete` for the CLI.

Every decoding path (greedy, sampling, beam search) goes through `Decoder`, which keeps a KV cache and feeds the
model one new token per step. Two rules about the context window (`context_size`, default the model's):

* A prompt longer than the window keeps its last `context_size` tokens (the book's `idx[:, -context_size:]`);
  a `PromptTruncatedWarning` says so.
* Decoding past the window slides it: each further token re-encodes the last `context_size` tokens (the cache
  is rebuilt), so the output equals the book's loop, which recomputes `idx[:, -context_size:]` at every step.

Generation never applies dropout, whatever the model's train/eval mode.
"""

from __future__ import annotations

import bisect
import codecs
import functools
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import tiktoken
import torch
import torch.nn.functional as F

from .errors import Gpt2LoadError
from .model import GPTModel, KVCache
from .sampling import apply_repetition_penalty, check_sampling, mask_token, sample
from .tokenizer import EOT_ID, encode


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the context window; only its last `context_size` tokens were used."""


# ---------------------------------------------------------------------------------------------------------------
# The forward pass used for decoding


@functools.cache
def _linear_for(device_type: str, dtype: torch.dtype) -> Callable:
    """The fastest correct `linear(x, weight, bias, gelu=False)` for this device and dtype.

    On CPU, oneDNN's matmul reads the [out, in] weights of nn.Linear at close to memory bandwidth for one or a
    few rows, where `F.linear` reaches about half of it; decoding is bound by reading the weights, so this is
    most of the speed. It is a private torch op, so it is checked against `F.linear` before it is used.
    """

    def plain(x, w, b, gelu=False):
        y = F.linear(x, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y

    if device_type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return plain

    def onednn(x, w, b, gelu=False):
        return op(x, w, b, "gelu", [], "tanh") if gelu else op(x, w, b, "none", [], "")

    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((3, 16), (8, 16), (8,)))
        with torch.inference_mode():
            ok = all(
                torch.allclose(onednn(x, w, bias, gelu), plain(x, w, bias, gelu), atol=1e-5)
                for bias in (b, None)
                for gelu in (False, True)
            )
    except (AttributeError, RuntimeError):
        return plain
    return onednn if ok else plain


def fuse_qkv(model: GPTModel) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per layer, W_query, W_key and W_value stacked into one [3 * d, d] weight (and bias).

    One matmul reads the three at once: for a single token, as fast as reading one of them alone. The model
    keeps its own three Linears (the book's parameters). Loaded from gpt2load's files they lie back to back, and
    this is a view; otherwise decoding holds a copy while it runs (85 MB for 124M in fp32).
    """
    fused = []
    with torch.no_grad():
        for block in model.trf_blocks:
            lins = (block.att.W_query, block.att.W_key, block.att.W_value)
            bias = None if lins[0].bias is None else _stacked([lin.bias for lin in lins])
            fused.append((_stacked([lin.weight for lin in lins]), bias))
    return fused


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)`, as a view when the parts already lie back to back in one storage (as gpt2load's
    own files and the models loaded from them have them), else a copy."""
    first = parts[0]
    n = first.numel()
    adjacent = all(
        p.is_contiguous()
        and p.shape == first.shape
        and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and p.storage_offset() == first.storage_offset() + i * n
        for i, p in enumerate(parts)
    )
    if adjacent:
        return first.as_strided((len(parts) * first.shape[0], *first.shape[1:]), first.stride())
    return torch.cat(parts)


def forward_last(
    model: GPTModel,
    idx: torch.Tensor,
    cache: KVCache,
    attn_mask: torch.Tensor | None = None,
    pos_ids: torch.Tensor | None = None,
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """Float32 logits [B, vocab] of the last position of `idx` [B, T], appending T positions to `cache`.

    The inference twin of `GPTModel.forward` (same weights, same math, tested equal to it), for decoding: no
    dropout; q/k/v from one fused weight (`fuse_qkv(model)`, built here if not given); in the last block, the
    attention output, feed-forward and output head only for the last position (the others only need their
    keys and values, which are cached); faster matmuls where available. Call it under `torch.inference_mode()`.
    """
    w = model.tok_emb.weight
    linear = _linear_for(w.device.type, w.dtype)
    qkv = fuse_qkv(model) if qkv is None else qkv
    B, T = idx.shape
    start = cache.pos
    pos = model.pos_emb.weight[start : start + T] if pos_ids is None else F.embedding(pos_ids, model.pos_emb.weight)
    x = F.embedding(idx, w) + pos
    last = len(model.trf_blocks) - 1
    for i, block in enumerate(model.trf_blocks):
        att, n1, n2 = block.att, block.norm1, block.norm2
        h = F.layer_norm(x, x.shape[-1:], n1.scale, n1.shift, n1.eps)
        h = linear(h, *qkv[i]).view(B, T, 3, att.num_heads, att.head_dim)
        q, k, v = h.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        k, v = cache.update(i, k, v)
        if i == last and T > 1:  # only the last position matters from here on; all keys/values are cached
            q, x = q[:, :, -1:], x[:, -1:]
            attn_mask = None if attn_mask is None else attn_mask[:, :, -1:]
        Tq = q.shape[2]
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token sees everything cached
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk after cached positions: causal with an offset
            allowed = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = y.transpose(1, 2).reshape(B, Tq, att.d_out)
        x = x + linear(y, att.out_proj.weight, att.out_proj.bias)
        h = F.layer_norm(x, x.shape[-1:], n2.scale, n2.shift, n2.eps)
        fc1, fc2 = block.ff.layers[0], block.ff.layers[2]
        x = x + linear(linear(h, fc1.weight, fc1.bias, gelu=True), fc2.weight, fc2.bias)
    cache.pos = start + T
    fn = model.final_norm
    x = F.layer_norm(x[:, -1], x.shape[-1:], fn.scale, fn.shift, fn.eps)
    return linear(x, model.out_head.weight, None).float()


# ---------------------------------------------------------------------------------------------------------------
# Incremental decoding of a batch


class Decoder:
    """Feeds a batch of rows to the model one token at a time, with a KV cache and a sliding window.

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
        self.model = model
        self.qkv = fuse_qkv(model)
        self.window = check_context(model, context_size)
        N, P = idx.shape
        self.seq = torch.empty(N, P + max_new_tokens, dtype=torch.long, device=idx.device)
        self.seq[:, :P] = idx
        self.keep: torch.Tensor | None = None  # bool [N, P + max_new_tokens]: False for left padding
        real = P
        if attention_mask is not None and not bool(attention_mask.all()):
            self.keep = torch.ones(N, P + max_new_tokens, dtype=torch.bool, device=idx.device)
            self.keep[:, :P] = attention_mask.bool()
            self.seq[:, :P].masked_fill_(~self.keep[:, :P], 0)  # pads are masked out, but must be valid ids
            real = int(attention_mask.sum(1).max())
        if real > self.window:
            warnings.warn(
                f"the prompt has {real} tokens but the context holds {self.window}: using its last "
                f"{self.window} tokens",
                PromptTruncatedWarning,
                stacklevel=_caller_level(),
            )
        self.length = P  # columns of `seq` filled
        kept = min(P, self.window)
        self.cache = model.new_cache(N, min(self.window, kept + max_new_tokens))
        self.npos = None  # per-row position of the next token, when rows are padded
        self.logits = self._encode(P - kept)

    def _encode(self, start: int) -> torch.Tensor:
        """(Re)build the cache from columns [start, length) and return the last logits."""
        self.start = start
        self.cache.crop(0)
        chunk = self.seq[:, start : self.length]
        if self.keep is not None and bool(self.keep[:, start:].all()):
            self.keep = None  # the padding has slid out of the window for good
        if self.keep is None:
            self.logits = forward_last(self.model, chunk, self.cache, qkv=self.qkv)
            return self.logits
        real = self.keep[:, start : self.length]
        T = real.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=real.device)  # pads see themselves: no all-masked rows (NaN)
        mask = (causal & real[:, None, :]) | eye
        pos_ids = (real.cumsum(1) - 1).clamp(min=0)
        self.npos = real.sum(1)
        self.logits = forward_last(self.model, chunk, self.cache, mask[:, None], pos_ids, self.qkv)
        return self.logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row [N]; return the next-token logits [N, vocab]."""
        self.seq[:, self.length] = tokens
        self.length += 1
        if self.length - self.start > self.cache.max_len:  # the window is full: slide it
            return self._encode(self.length - self.window)
        if self.keep is None:
            self.logits = forward_last(self.model, tokens[:, None], self.cache, qkv=self.qkv)
        else:
            mask = self.keep[:, None, None, self.start : self.length]
            self.logits = forward_last(self.model, tokens[:, None], self.cache, mask, self.npos[:, None], self.qkv)
            self.npos = self.npos + 1
        return self.logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search): rows may be repeated or dropped."""
        self.seq = self.seq.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        if self.keep is not None:
            self.keep = self.keep.index_select(0, index)
            self.npos = self.npos.index_select(0, index)
        self.cache.reorder(index)


def _caller_level() -> int:
    """The `stacklevel` that makes a warning point at the first caller outside gpt2load and torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("gpt2load", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def check_context(model: GPTModel, context_size: int | None) -> int:
    """The window to use: `context_size`, or the model's context length."""
    limit = model.cfg.context_length
    if context_size is None:
        return limit
    if isinstance(context_size, bool) or not isinstance(context_size, int) or not 1 <= context_size <= limit:
        raise Gpt2LoadError(
            f"context_size must be between 1 and the model's context length {limit}, got {context_size!r}"
        )
    return context_size


def check_prompt(model: GPTModel, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
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
    vocab = model.cfg.vocab_size
    outside = (idx < 0) | (idx >= vocab)
    if attention_mask is not None:
        outside &= attention_mask.bool()  # padding may use any id
    if bool(outside.any()):
        raise Gpt2LoadError(
            f"token id {int(idx[outside][0])} is outside the model's vocabulary of {vocab} tokens: "
            "use a tokenizer that matches the model"
        )


def check_lengths(max_new_tokens: int, min_new_tokens: int = 0) -> None:
    for name, n in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise Gpt2LoadError(f"{name} must be a whole number >= 0, got {n!r}")
    if min_new_tokens > max_new_tokens:
        raise Gpt2LoadError(f"min_new_tokens ({min_new_tokens}) is larger than max_new_tokens ({max_new_tokens})")


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


# ---------------------------------------------------------------------------------------------------------------
# Greedy decoding and sampling


def _make_generator(seed: int | None, generator: torch.Generator | None, device: torch.device):
    if seed is not None and generator is not None:
        raise Gpt2LoadError("give either seed or generator, not both")
    if seed is None:
        return generator
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise Gpt2LoadError(f"seed must be a whole number, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def generate_stream(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    *,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Generate token by token: yields the new token ids [B] of each step.

    Arguments as `generate`. A row that has produced `eos_id` yields `eos_id` from then on; the iteration ends
    after `max_new_tokens` steps, or after the step on which the last row produced `eos_id` (that step is
    yielded). Breaking out of the loop stops generation. Arguments are checked here, before the first step.
    """
    check_prompt(model, idx, attention_mask)
    check_lengths(max_new_tokens, min_new_tokens)
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    check_context(model, context_size)
    if eos_id is not None and not 0 <= eos_id < model.cfg.vocab_size:
        raise Gpt2LoadError(f"eos_id {eos_id} is outside the model's vocabulary of {model.cfg.vocab_size} tokens")
    gen = _make_generator(seed, generator, idx.device)
    return _stream(
        model,
        idx,
        max_new_tokens,
        context_size,
        temperature,
        top_k,
        eos_id,
        top_p,
        repetition_penalty,
        min_new_tokens,
        gen,
        attention_mask,
    )


@torch.inference_mode()
def _stream(
    model,
    idx,
    max_new_tokens,
    context_size,
    temperature,
    top_k,
    eos_id,
    top_p,
    repetition_penalty,
    min_new_tokens,
    gen,
    attention_mask,
) -> Iterator[torch.Tensor]:
    if max_new_tokens == 0:
        return
    dec = Decoder(model, idx, max_new_tokens, context_size, attention_mask)
    N = idx.shape[0]
    seen = None  # bool [N, vocab]: tokens in each row so far, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(N, model.cfg.vocab_size, dtype=torch.bool, device=idx.device)
        real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = torch.arange(N, device=idx.device)[:, None].expand_as(idx)
        seen[rows[real], idx[real]] = True
    done = torch.zeros(N, dtype=torch.bool, device=idx.device)
    logits = dec.logits
    for i in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if eos_id is not None and i < min_new_tokens:
            logits = mask_token(logits, eos_id)
        tokens = sample(logits, temperature, top_k, top_p, gen)
        if eos_id is not None:
            tokens = tokens.masked_fill(done, eos_id)
            done |= tokens == eos_id
        yield tokens
        if eos_id is not None and bool(done.all()):
            return
        if seen is not None:
            seen[torch.arange(N, device=idx.device), tokens] = True
        if i + 1 < max_new_tokens:
            logits = dec.step(tokens)


def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    *,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The book's `generate` (same positional arguments, same result), with a KV cache and more options.

    Args:
        model: a GPTModel.
        idx: token ids [B, T]; rows of different lengths are left-padded with `attention_mask` (see `left_pad`).
        max_new_tokens: tokens to add to each row.
        context_size: the window the model sees (default and maximum: the model's context length). A longer
            prompt keeps its last `context_size` tokens (with a PromptTruncatedWarning); past the window,
            each new token re-encodes the last `context_size` tokens, as the book's loop does.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k: sample among the k most likely tokens only.
        eos_id: stop a row when it produces this id; generation ends when every row has. As in the book, the
            final step (on which the last row produced it) is not appended; earlier-finished rows are padded
            with eos_id.
        top_p: sample from the smallest set of tokens whose probability adds up to top_p (nucleus).
        repetition_penalty: transformers' rule over the tokens in the row so far, prompt included.
        min_new_tokens: forbid eos_id before this many new tokens.
        seed: make sampling reproducible with a private torch.Generator (global RNG untouched).
        generator: a torch.Generator to draw from instead (None and no seed: torch's global RNG, as the book).
        attention_mask: [B, T], 1 for tokens and 0 for left padding.

    Returns:
        idx with the new tokens appended, [B, T + n] with n <= max_new_tokens.
    """
    steps = list(
        generate_stream(
            model,
            idx,
            max_new_tokens,
            context_size,
            temperature,
            top_k,
            eos_id,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            min_new_tokens=min_new_tokens,
            seed=seed,
            generator=generator,
            attention_mask=attention_mask,
        )
    )
    if eos_id is not None and steps and bool((steps[-1] == eos_id).all()):
        steps.pop()  # the book breaks before appending eos_id
    return torch.cat([idx, *(s[:, None].to(idx.dtype) for s in steps)], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Text


def stream_text(enc: tiktoken.Encoding, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces of a stream of token ids, each emitted once its UTF-8 bytes are complete.

    A character split across tokens (emoji, CJK) appears whole, with the token that completes it. The pieces
    join to `enc.decode(all ids)` (invalid bytes become U+FFFD, as there).
    """
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in token_ids:
        piece = utf8.decode(enc.decode_single_token_bytes(int(t)))
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail


class _TextTracker:
    """Decoded text of a growing token list, the text offset where each token starts, and stop strings."""

    def __init__(self, enc: tiktoken.Encoding, stop: Sequence[str], on_text: Callable[[str], object] | None):
        self.enc, self.stop, self.on_text = enc, stop, on_text
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[int] = []
        self.starts: list[int] = []  # len(text) before each token: a token's text starts there
        self.text = ""
        self.sent = 0  # characters passed to on_text
        self.cut: int | None = None  # where a stop string begins, once one is found

    def add(self, token: int, final: bool = False) -> bool:
        """Append a token (or flush with final=True); True once a stop string has appeared."""
        before = len(self.text)
        if not final:
            self.tokens.append(token)
            self.starts.append(before)
            self.text += self.utf8.decode(self.enc.decode_single_token_bytes(token))
        else:
            self.text += self.utf8.decode(b"", final=True)
        longest = max((len(s) for s in self.stop), default=0)
        hits = [h for s in self.stop if (h := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.cut = min(hits)
            self.text = self.text[: self.cut]
        safe = len(self.text)
        if not hits and not final and longest:  # hold back a tail that may be the start of a stop string
            tail = self.text[-(longest - 1) :] if longest > 1 else ""
            held = max(
                (n for s in self.stop for n in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:n])), default=0
            )
            safe -= held
        if self.on_text is not None and safe > self.sent:
            self.on_text(self.text[self.sent : safe])
            self.sent = safe
        return bool(hits)

    def kept_tokens(self) -> list[int]:
        """The tokens that contribute to the (cut) text."""
        if self.cut is None:
            return self.tokens
        return self.tokens[: bisect.bisect_left(self.starts, self.cut)]


def _finish_text(enc, tokens: list[int], stop: Sequence[str], on_text=None) -> tuple[list[int], str]:
    tracker = _TextTracker(enc, stop, on_text)
    for t in tokens:
        if tracker.add(t):
            return tracker.kept_tokens(), tracker.text
    tracker.add(0, final=True)
    return tracker.kept_tokens(), tracker.text


def complete(
    model: GPTModel,
    enc: tiktoken.Encoding,
    prompt: str | Sequence[str],
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    stop: str | Sequence[str] = (),
    seed: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    context_size: int | None = None,
    on_text: Callable[[str], object] | None = None,
) -> dict | list[dict]:
    """Complete text prompts: what the CLI's `generate` command calls.

    Greedy decoding by default; `temperature` > 0 samples; `num_beams` > 1 runs beam search (no sampling
    settings then). Generation ends at `<|endoftext|>` (not included in the result), after `max_new_tokens`,
    or as soon as the text contains one of the `stop` strings (the text is cut before it; `token_ids` keep the
    tokens that contribute to the cut text). An empty prompt starts from `<|endoftext|>`, the token GPT-2 saw
    between documents. Several prompts run one after the other, with one random stream if `seed` is set.

    Args:
        on_text: called with each new piece of text as soon as it is final (greedy and sampling stream; beam
            search calls it once with the best completion).

    Returns:
        For one prompt (a str): `{"prompt_ids": [...], "completions": [{"token_ids": [...new tokens only...],
        "text": "...", "score": None or float}]}`, one completion per returned sequence, `score` set by beam
        search (sum of log-probabilities / length ** length_penalty). For a list of prompts: a list of those.
    """
    from .beam import beam_search, check_beam

    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise Gpt2LoadError(f"stop strings must be non-empty text, got {stop!r}")
    check_lengths(max_new_tokens, min_new_tokens)
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    check_beam(num_beams, num_return_sequences, length_penalty, early_stopping)
    check_context(model, context_size)
    if num_beams > 1:
        settings = {
            "temperature": temperature != 0.0,
            "top_k": top_k is not None,
            "top_p": top_p is not None,
            "repetition_penalty": repetition_penalty != 1.0,
            "min_new_tokens": min_new_tokens != 0,
        }
        clash = [k for k, used in settings.items() if used]
        if clash:
            raise Gpt2LoadError(
                f"{', '.join(clash)} cannot be combined with beam search (num_beams > 1): use one or the other"
            )
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(t, str) for t in texts):
        raise Gpt2LoadError("prompts must be text")
    device = model.tok_emb.weight.device
    eos = enc.eot_token if enc.eot_token < model.cfg.vocab_size else None
    gen = _make_generator(seed, None, device)
    results = []
    for text in texts:
        ids = encode(enc, text) or [enc.eot_token]
        idx = torch.tensor([ids], device=device)
        check_prompt(model, idx)
        completions = []
        if num_beams > 1:
            res = beam_search(
                model,
                idx,
                max_new_tokens,
                num_beams,
                length_penalty,
                early_stopping,
                eos,
                num_return_sequences,
                context_size=context_size,
            )
            for seq, score, n in zip(res.sequences, res.scores.tolist(), res.lengths.tolist(), strict=True):
                new = seq[len(ids) : len(ids) + n].tolist()
                if new and new[-1] == eos:
                    new.pop()
                kept, out = _finish_text(enc, new, stops)
                completions.append({"token_ids": kept, "text": out, "score": score})
            if on_text is not None and completions[0]["text"]:
                on_text(completions[0]["text"])
        else:
            tracker = _TextTracker(enc, stops, on_text)
            stopped = False
            for step in generate_stream(
                model,
                idx,
                max_new_tokens,
                context_size,
                temperature,
                top_k,
                eos,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                min_new_tokens=min_new_tokens,
                generator=gen,
            ):
                token = int(step[0])
                if token == eos:
                    break
                if tracker.add(token):
                    stopped = True
                    break
            if not stopped:
                tracker.add(0, final=True)
            completions.append({"token_ids": tracker.kept_tokens(), "text": tracker.text, "score": None})
        results.append({"prompt_ids": ids, "completions": completions})
    return results[0] if isinstance(prompt, str) else results


__all__ = [
    "Decoder",
    "PromptTruncatedWarning",
    "complete",
    "forward_last",
    "fuse_qkv",
    "generate",
    "generate_stream",
    "left_pad",
    "stream_text",
]
