"""One request's decoding state and the events it produces: settings, choices (sequences), text pieces.

A `Sequence` is one choice: its tokens so far, the text made final so far (stop strings held back until they
cannot match), the penalties' state and its own random stream. The batcher feeds it one token per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tiktoken
import torch

from ..generation.text import TextTracker


@dataclass
class SamplingParams:
    """How one request's sequences are decoded (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # top-N alternatives per token; None: no log-probabilities
    echo: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0


@dataclass
class TokenInfo:
    """One token of a choice, for `logprobs`: its id, log-probability, the top alternatives, text offset."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    offset: int


@dataclass
class Piece:
    """New text of choice `index` (and the tokens that make it, when log-probabilities were asked for)."""

    index: int
    text: str
    tokens: list[TokenInfo]


@dataclass
class Finish:
    """Choice `index` is complete: "stop" (EOS or a stop string) or "length"; `tokens` completion tokens."""

    index: int
    reason: str
    tokens: int


@dataclass
class Failure:
    """The worker failed on this request (a bug or out of memory); the message is for the log and the client."""

    message: str


class Request:
    """One API request: its prompts × n choices; events go to `emit` (called from the worker thread)."""

    def __init__(
        self,
        prompts: list[list[int]],
        n: int,
        params: SamplingParams,
        emit: Callable[[object], None],
        stream: bool = True,
    ) -> None:
        self.prompts, self.n, self.params, self.emit = prompts, n, params, emit
        self.stream = stream  # False: each choice's text arrives in one Piece, just before its Finish
        self.cancelled = False
        self.failed = False
        self.started = 0  # choices the batcher has begun; the rest wait as this count, costing no memory
        self.on_cancel: Callable[[], None] | None = None  # set by the batcher, which then drops what still waits

    @property
    def choices(self) -> int:
        """Its choices: prompts × n."""
        return len(self.prompts) * self.n

    @property
    def cost(self) -> int:
        """Rows of decoding it queues: prompts × n, or prompts × num_beams for a beam search."""
        return len(self.prompts) * (self.n if self.params.num_beams == 1 else self.params.num_beams)

    def cancel(self) -> None:
        """The client went away: its sequences leave at the next step, and those not begun never start."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    def fail(self, message: str) -> None:
        """Send one Failure (the first failure's), and stop the request's other choices."""
        if not self.failed:
            self.failed = True
            self.cancel()
            self.emit(Failure(message))


class Sequence:
    """One choice being decoded: its tokens so far, text (with stop strings), penalties' state and RNG."""

    def __init__(
        self, request: Request, index: int, prompt: list[int], enc: tiktoken.Encoding, vocab: int, device=None
    ) -> None:
        p = request.params
        self.request, self.index, self.prompt, self.enc, self.params = request, index, prompt, enc, p
        self.generator = torch.Generator(device=device)  # on the logits' device, as sampling needs
        if p.seed is None:
            self.generator.seed()
        else:  # choice 0 draws as `gpt2load generate --seed` does; the others get their own derived streams
            self.generator.manual_seed((p.seed + index * 0x9E3779B97F4A7C15) % 2**64)
        self.tracker = TextTracker(enc, p.stop, self._released)
        self.base = len(enc.decode(prompt)) if p.echo else 0  # text offsets count the echoed prompt
        self.infos: list[TokenInfo] = []  # tokens whose text is not released yet
        self.sent_tokens = 0
        self.out: list[Piece] = []
        self.generated = 0
        self.last = prompt[-1]
        self.seen = self.counts = None
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, prompt] = True
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(1, vocab, device=device)

    def _released(self, text: str) -> None:
        """Text the tracker has made final: send it with the tokens that start inside it."""
        upto = self.tracker.sent + len(text)
        n = 0
        while n < len(self.infos) and self.infos[n].offset - self.base < upto:
            n += 1
        self.out.append(Piece(self.index, text, self.infos[:n]))
        self.sent_tokens += n
        del self.infos[:n]

    def accept(self, token: int, info: TokenInfo | None, eos: int | None) -> str | None:
        """Take the next token; the finish reason once the choice is complete, else None."""
        self.generated += 1
        if token == eos:
            return self.finish("stop")
        if info is not None:
            info.offset = self.base + len(self.tracker.text)
            self.infos.append(info)
        if self.tracker.add(token):
            return self.finish("stop")
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        self.last = token
        return self.finish("length") if self.generated >= self.params.max_tokens else None

    def finish(self, reason: str) -> str:
        """Flush the text, send the log-probabilities of the kept tokens not sent yet, and end the choice."""
        if self.tracker.cut is None:
            self.tracker.add(0, final=True)
        kept = len(self.tracker.kept_tokens())  # tokens after a stop string's start are not part of the answer
        if kept > self.sent_tokens and self.infos:
            self.out.append(Piece(self.index, "", self.infos[: kept - self.sent_tokens]))
        self.infos = []
        self.out.append(Finish(self.index, reason, kept))
        return reason

    def flush(self) -> None:
        """Hand the pending events to the request's consumer (once at the end when it does not stream: waking
        the server's event loop for every token costs the decoding thread time)."""
        if self.request.cancelled:  # nobody reads them (or a Failure went first)
            self.out = []
            return
        done = bool(self.out) and isinstance(self.out[-1], Finish)
        if not self.request.stream and not done:
            return
        events = self.out
        if not self.request.stream:
            pieces = [e for e in events if isinstance(e, Piece)]
            text, tokens = "".join(p.text for p in pieces), [t for p in pieces for t in p.tokens]
            events = [Piece(self.index, text, tokens), events[-1]]
        for event in events:
            if not isinstance(event, Piece) or event.text or event.tokens:
                self.request.emit(event)
        self.out = []
