"""Text in and out: streaming decoded text, stop strings, and `complete` (what the CLI's `generate` calls)."""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace

import tiktoken
import torch
from torch import nn

from ..errors import Gpt2LoadError
from ..tokenizer import encode, token_bytes
from .beam import beam_search, check_beam
from .decoding import check_context, check_prompt, model_device, model_vocab
from .generate import make_generator, stream
from .sampling import GenerationConfig


def stream_text(enc: tiktoken.Encoding, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces of a stream of token ids, each emitted once its UTF-8 bytes are complete.

    A character split across tokens (emoji, CJK) appears whole, with the token that completes it. The pieces
    join to `enc.decode(all ids)` (invalid bytes become U+FFFD, as there).
    """
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in token_ids:
        piece = utf8.decode(token_bytes(enc, int(t)))
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail


class TextTracker:
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
            self.text += self.utf8.decode(token_bytes(self.enc, token))
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


def finish_text(enc, tokens: list[int], stop: Sequence[str], on_text=None) -> tuple[list[int], str]:
    tracker = TextTracker(enc, stop, on_text)
    for t in tokens:
        if tracker.add(t):
            return tracker.kept_tokens(), tracker.text
    tracker.add(0, final=True)
    return tracker.kept_tokens(), tracker.text


def complete(
    model: nn.Module,
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
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise Gpt2LoadError(f"stop strings must be non-empty text, got {stop!r}")
    config = GenerationConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, min_new_tokens)
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
    device = model_device(model)
    vocab = model_vocab(model)
    eos = enc.eot_token if vocab is None or enc.eot_token < vocab else None
    gen = make_generator(seed, None, device)
    # Rows past the tokenizer's (llm.c's and nanoGPT's padding to a multiple of 64 or 128) are no tokens: with
    # zero weights they score 0, above a trained model's typical logits, and would be chosen.
    limit = enc.n_vocab if vocab is not None and vocab > enc.n_vocab else None
    config = replace(config, eos_id=eos, vocab_limit=limit)
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
                vocab_limit=limit,
            )
            for seq, score, n in zip(res.sequences, res.scores.tolist(), res.lengths.tolist(), strict=True):
                new = seq[len(ids) : len(ids) + n].tolist()
                if new and new[-1] == eos:
                    new.pop()
                kept, out = finish_text(enc, new, stops)
                completions.append({"token_ids": kept, "text": out, "score": score})
            if on_text is not None and completions[0]["text"]:
                on_text(completions[0]["text"])
        else:
            tracker = TextTracker(enc, stops, on_text)
            stopped = False
            for step in stream(model, idx, config, context_size, gen):
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


__all__ = ["TextTracker", "complete", "finish_text", "stream_text"]
