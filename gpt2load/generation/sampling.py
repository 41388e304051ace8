"""Choosing the next token: pure functions on logits [batch, vocab], testable on a hand-made distribution.

The rules are transformers' logits processors, in transformers' order: repetition penalty, minimum length,
then temperature, top-k and top-p (nucleus). Temperature 0 means greedy (argmax).

A temperature so small that a row's scaled logits overflow float32 (9e-39 with logits of a few units, or 1e-300,
which is 0 in float32) draws from the limit of softmax(logits / T) as T -> 0: the row's most likely tokens, so it
decodes greedily (ties drawn evenly) instead of failing on a NaN distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import Gpt2LoadError

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already in the sequence: positive logits are divided by `penalty`, negative multiplied.

    Args:
        logits: [B, V].
        seen: bool [B, V], True for every token id present in the row so far (prompt included).
        penalty: > 1 discourages repetition, < 1 encourages it, 1 changes nothing.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens whose probabilities add up to at least p.

    transformers' TopPLogitsWarper rule (min_tokens_to_keep=1): sort ascending, drop the tokens whose cumulative
    probability is <= 1 - p; the most probable token is always kept.
    """
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def mask_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Forbid one token (e.g. EOS before min_new_tokens): its logit becomes -inf."""
    out = logits.clone()
    out[..., token_id] = -math.inf
    return out


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token id of each row, [B]: argmax when temperature is 0, else a draw after the filters.

    Args:
        logits: [B, V] (already penalised if a repetition penalty is used).
        temperature: 0 for greedy; > 0 to sample from softmax(logits / temperature) (greedily when it is so
            small that logits / temperature overflows: see the module docstring).
        top_k: keep only the k most likely tokens before sampling.
        top_p: keep only the nucleus of probability mass p before sampling.
        generator: the random stream to draw from (None: torch's global one, as the book uses).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    raw = logits.float()
    # Past float32's largest number, -inf / T would be NaN; the distribution is uniform long before that.
    logits = apply_temperature(raw, min(temperature, _FLOAT32_MAX))
    over = ~torch.isfinite(logits.amax(dim=-1, keepdim=True))
    if bool(over.any()):  # tiny T overflowed: the T -> 0 limit, unless the logits themselves were not finite
        peak = raw.amax(dim=-1, keepdim=True)
        over &= torch.isfinite(peak)
        logits = torch.where(over, torch.where(raw == peak, 0.0, -math.inf), logits)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
    """Raise a Gpt2LoadError naming the first bad sampling setting."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0:  # `not >=` also catches NaN
        raise Gpt2LoadError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise Gpt2LoadError(f"top_k must be a whole number >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise Gpt2LoadError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise Gpt2LoadError(f"repetition_penalty must be > 0 (1.0 = none), got {repetition_penalty!r}")


def _whole(name: str, n: object, low: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < low:
        raise Gpt2LoadError(f"{name} must be a whole number >= {low}, got {n!r}")


def check_lengths(max_new_tokens: int, min_new_tokens: int = 0) -> None:
    """Raise a Gpt2LoadError unless 0 <= min_new_tokens <= max_new_tokens, both whole numbers."""
    _whole("max_new_tokens", max_new_tokens, 0)
    _whole("min_new_tokens", min_new_tokens, 0)
    if min_new_tokens > max_new_tokens:
        raise Gpt2LoadError(f"min_new_tokens ({min_new_tokens}) is larger than max_new_tokens ({max_new_tokens})")


@dataclass(frozen=True)
class GenerationConfig:
    """How to choose tokens, validated on construction (see `generate` for the meaning of each field)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    eos_id: int | None = None
    vocab_limit: int | None = None  # only ids below it are chosen (a vocabulary padded past the tokenizer's)

    def __post_init__(self) -> None:
        check_lengths(self.max_new_tokens, self.min_new_tokens)
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        if self.eos_id is not None:
            _whole("eos_id", self.eos_id, 0)
        if self.vocab_limit is not None:
            _whole("vocab_limit", self.vocab_limit, 1)

    def check_vocab(self, vocab_size: int | None) -> None:
        """Raise unless eos_id is a token of a vocabulary of `vocab_size` (None: unknown, not checked)."""
        if self.eos_id is not None and vocab_size is not None and self.eos_id >= vocab_size:
            raise Gpt2LoadError(f"eos_id {self.eos_id} is outside the model's vocabulary of {vocab_size} tokens")


__all__ = [
    "GenerationConfig",
    "apply_repetition_penalty",
    "check_lengths",
    "apply_temperature",
    "check_sampling",
    "mask_token",
    "sample",
    "top_k_filter",
    "top_p_filter",
]
