"""OpenAI's response shapes: a completion or chat completion, its stream chunks, usage and log-probabilities."""

from __future__ import annotations

import time

import tiktoken

from ..tokenizer import token_bytes
from .protocol import Job
from .sequence import Finish, Piece, TokenInfo


class Answer:
    """The answer to one request, built from the batcher's events: choices' text, tokens and finish reasons."""

    def __init__(self, id: str, chat: bool, model: str, enc: tiktoken.Encoding, job: Job) -> None:
        self.id, self.chat, self.model, self.enc, self.job = id, chat, model, enc, job
        self.created = int(time.time())
        self.total = len(job.prompts) * job.n
        self.text = [""] * self.total
        self.tokens: list[list[TokenInfo]] = [[] for _ in range(self.total)]
        self.finish: list[str | None] = [None] * self.total
        self.completion_tokens = 0

    def add(self, event: object) -> None:
        if isinstance(event, Piece):
            self.text[event.index] += event.text
            self.tokens[event.index] += event.tokens
        elif isinstance(event, Finish):
            self.finish[event.index] = event.reason
            self.completion_tokens += event.tokens

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.job.prompts)
        done = self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _token_text(self, t: int) -> str:
        return token_bytes(self.enc, t).decode("utf-8", errors="replace")

    def logprobs(self, tokens: list[TokenInfo]) -> dict | None:
        """Log-probabilities in the completions shape, or the chat shape (`content`)."""
        if self.job.params.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_token(t) for t in tokens]}
        return {
            "tokens": [self._token_text(t.id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.top is None else {self._token_text(i): lp for i, lp in t.top} for t in tokens],
            "text_offset": [t.offset for t in tokens],
        }

    def _chat_token(self, t: TokenInfo) -> dict:
        def one(token: int, logprob: float) -> dict:
            raw = token_bytes(self.enc, token)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return {**one(t.id, t.logprob), "top_logprobs": [one(i, lp) for i, lp in t.top or []]}

    def _choice(self, i: int, text: str, tokens: list[TokenInfo], finish: str | None, delta: dict | None = None):
        out: dict = {"index": i}
        if not self.chat:
            out["text"] = text
        elif delta is not None:
            out["delta"] = delta
        else:
            out["message"] = {"role": "assistant", "content": text}
        return {**out, "logprobs": self.logprobs(tokens), "finish_reason": finish}

    def response(self) -> dict:
        """The whole answer (not streamed)."""
        choices = [self._choice(i, self.text[i], self.tokens[i], self.finish[i]) for i in range(self.total)]
        return {**self._head(False), "choices": choices, "usage": self.usage()}

    def first_chunk(self) -> dict | None:
        """Chat streams open each choice with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return {**self._head(True), "choices": [self._choice(i, "", [], None, delta) for i in range(self.total)]}

    def chunk(self, event: Piece | Finish) -> dict:
        """A stream chunk for one event: new text of a choice, or its finish reason."""
        if isinstance(event, Piece):
            choice = self._choice(event.index, event.text, event.tokens, None, {"content": event.text})
        else:
            choice = self._choice(event.index, "", [], event.reason, {})
            choice["logprobs"] = None
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self) -> dict:
        """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": self.usage()}
