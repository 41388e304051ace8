"""`generate` (the book's function, with a KV cache and more options) and `generate_stream`, token by token."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..errors import Gpt2LoadError
from .decoding import check_context, check_prompt, make_decoder, model_device, model_vocab
from .sampling import GenerationConfig, apply_repetition_penalty, mask_token, sample


def make_generator(seed: int | None, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The random stream to sample from: a private one seeded with `seed`, `generator`, or None (global)."""
    if seed is not None and generator is not None:
        raise Gpt2LoadError("give either seed or generator, not both")
    if seed is None:
        return generator
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise Gpt2LoadError(f"seed must be a whole number between -2**63 and 2**64 - 1, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def generate_stream(
    model: nn.Module,
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
    config = GenerationConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, min_new_tokens, eos_id)
    return stream(model, idx, config, context_size, make_generator(seed, generator, idx.device), attention_mask)


def stream(
    model: nn.Module,
    idx: torch.Tensor,
    config: GenerationConfig,
    context_size: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """`generate_stream` with its settings in one GenerationConfig (checked here, before the first step)."""
    check_prompt(model, idx, attention_mask)
    check_context(model, context_size)
    config.check_vocab(model_vocab(model))
    if isinstance(idx, torch.Tensor) and idx.device != model_device(model):
        raise Gpt2LoadError(f"idx is on {idx.device} but the model is on {model_device(model)}: move one of them")
    return _steps(model, idx, config, context_size, generator, attention_mask)


@torch.inference_mode()
def _steps(model, idx, config: GenerationConfig, context_size, gen, attention_mask) -> Iterator[torch.Tensor]:
    if config.max_new_tokens == 0:
        return
    dec = make_decoder(model, idx, config.max_new_tokens, context_size, attention_mask)
    N = idx.shape[0]
    eos_id = config.eos_id
    seen = None  # bool [N, vocab]: tokens in each row so far, for the repetition penalty
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(N, dec.logits.shape[-1], dtype=torch.bool, device=idx.device)
        real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = torch.arange(N, device=idx.device)[:, None].expand_as(idx)
        seen[rows[real], idx[real]] = True
    done = torch.zeros(N, dtype=torch.bool, device=idx.device)
    logits = dec.logits
    for i in range(config.max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if eos_id is not None and i < config.min_new_tokens:
            logits = mask_token(logits, eos_id)
        allowed = logits if config.vocab_limit is None else logits[:, : config.vocab_limit]
        tokens = sample(allowed, config.temperature, config.top_k, config.top_p, gen)
        if eos_id is not None:
            tokens = tokens.masked_fill(done, eos_id)
            done |= tokens == eos_id
        yield tokens
        if eos_id is not None and bool(done.all()):
            return
        if seen is not None:
            seen[torch.arange(N, device=idx.device), tokens] = True
        if i + 1 < config.max_new_tokens:
            logits = dec.step(tokens)


def generate(
    model: nn.Module,
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
        model: a gpt2load GPTModel (decoded with a KV cache, through its own forward), or any model called as
            `logits = model(idx)`, such as the book's own GPTModel (decoded as the book's loop does, with a
            BookModelWarning once).
        idx: token ids [B, T]; rows of different lengths are left-padded with `attention_mask` (see
            `gpt2load.left_pad`).
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
    config = GenerationConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, min_new_tokens, eos_id)
    gen = make_generator(seed, generator, idx.device if isinstance(idx, torch.Tensor) else None)
    steps = list(stream(model, idx, config, context_size, gen, attention_mask))
    if eos_id is not None and steps and bool((steps[-1] == eos_id).all()):
        steps.pop()  # the book breaks before appending eos_id
    return torch.cat([idx, *(s[:, None].to(idx.dtype) for s in steps)], dim=1)


__all__ = ["generate", "generate_stream", "make_generator", "stream"]
