"""Continuous batching: one thread owns the model and decodes every active sequence with one forward per step.

Each sequence keeps its keys and values in one row of a shared `SlotCache`, left-aligned (its own positions
0..n-1), so rows of different lengths decode together: the new token of row b is written at column len_b, its
position is len_b, and the attention mask hides columns past it. A request joins at the next step (its prompt is
encoded alone, then copied into a free row) and leaves when done, freeing the row for the next in the queue.

A fault stays with the request that caused it: a row whose sampling (or whose consumer) fails gets a Failure and
leaves while the others go on; a failed batched forward fails that step's rows and starts a fresh cache. If
something unexpected ends the thread, its in-flight requests fail and it is restarted; a second death within
`restart_window` seconds stops the batcher for good (`alive` is False, `on_fatal` is called) so that a
supervisor restarts the server. Cancellation is honoured at every step, between a beam search's steps and
prompts, and queued choices of a cancelled request are dropped without any work.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

import tiktoken
import torch

from ..generation.beam import beam_search
from ..generation.sampling import apply_repetition_penalty, mask_token, sample
from ..model.gpt import GPTModel
from ..tokenizer import decode_ids, token_bytes
from .sequence import Piece, Request, Sequence, TokenInfo
from .slots import SlotCache

log = logging.getLogger("gpt2load.serve")

__all__ = ["Batcher", "QueueFull", "SlotCache"]

_FAILED = "error"  # the finish "reason" of a row that failed: it leaves, and its request has had its Failure


class QueueFull(Exception):
    """The request cannot be queued: too many requests or choices wait, or the batcher has stopped (the message
    says which)."""


class Batcher:
    """Runs decode steps for every active sequence in a background thread; `submit` queues requests.

    Args:
        model: the model, owned by the batcher's thread from now on.
        enc: its tokenizer.
        max_batch_size: sequences decoded together in one forward.
        max_queue: requests waiting at most.
        max_queued_choices: rows waiting at most, summed over the waiting requests (prompts × n, or prompts ×
            num_beams for a beam search); a request larger than this never fits. A waiting choice costs a count,
            no memory: its state is made when it starts.
        on_fatal: called with the exception (from the dying thread) when the thread has died twice within
            `restart_window` seconds and stays stopped, e.g. to make the server exit for its supervisor.
        restart_window: seconds; a death longer than this after the previous one restarts the thread.
    """

    def __init__(
        self,
        model: GPTModel,
        enc: tiktoken.Encoding,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_queued_choices: int = 4096,
        on_fatal: Callable[[BaseException], None] | None = None,
        restart_window: float = 60.0,
    ) -> None:
        self.model, self.enc = model, enc
        self.max_batch_size, self.max_queue, self.max_queued_choices = max_batch_size, max_queue, max_queued_choices
        self.on_fatal, self.restart_window = on_fatal, restart_window
        self.eos = enc.eot_token if enc.eot_token < model.cfg.vocab_size else None
        # a vocabulary padded past the tokenizer's (llm.c, nanoGPT): the padding rows are never chosen
        self.vocab = min(model.cfg.vocab_size, enc.n_vocab)
        self.device = model.pos_emb.weight.device
        self.cache: SlotCache | None = SlotCache(model, max_batch_size)
        self.active: list[Sequence] = []
        self.pending: collections.deque[Request] = collections.deque()  # each with choices not begun yet
        self.queued_choices = 0
        self.current: Request | None = None  # the request whose choice is starting, or whose beams run
        self.cond = threading.Condition()
        self.closed = False
        self.stopped: BaseException | None = None  # what killed the thread for good
        self.last_death: float | None = None
        self.restarts = 0
        self.purge = False  # a request was cancelled: drop its waiting choices
        self.peak = 0  # the most sequences decoded in one step so far
        self.thread = self._spawn()

    @property
    def alive(self) -> bool:
        """The decoding thread runs (or is being restarted) and has not stopped for good."""
        return self.stopped is None and self.thread.is_alive()

    def stats(self) -> dict[str, int]:
        with self.cond:
            beams = self.current.params.num_beams if self.current is not None else 1
            return {
                "active": len(self.active) + (beams if beams > 1 else 0),
                "queued": len(self.pending),
                "queued_choices": self.queued_choices,
                "peak_batch": self.peak,
                "restarts": self.restarts,
            }

    def submit(self, request: Request) -> None:
        """Queue a request's choices; raises QueueFull when the queue's limits would be passed, or the batcher
        has stopped."""
        cost = request.cost
        with self.cond:
            if self.stopped is not None:
                raise QueueFull("the server's decoding thread has stopped: the server needs a restart")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are already waiting (the server's limit)")
            if self.queued_choices + cost > self.max_queued_choices:
                raise QueueFull(
                    f"{self.queued_choices} choices are waiting and this request adds {cost}: more than the"
                    f" server's limit of {self.max_queued_choices}"
                )
            request.on_cancel = self._note_cancel
            self.pending.append(request)
            self.queued_choices += cost
            self.cond.notify()

    def _note_cancel(self) -> None:
        self.purge = True  # read by the thread at its next step (it does not wait while anything is queued)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        thread = None
        while thread is not self.thread:  # a restart may replace it meanwhile
            thread = self.thread
            thread.join()

    def _spawn(self) -> threading.Thread:
        thread = threading.Thread(target=self._main, name="gpt2load-batcher", daemon=True)
        thread.start()
        return thread

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # whatever ends the thread: its requests must hear, and /health must know
            self._died(e)

    def _died(self, e: BaseException) -> None:
        log.error(f"the decoding thread died: {type(e).__name__}: {e}", exc_info=e)
        now = time.monotonic()
        with self.cond:
            failed = [s.request for s in self.active] + ([self.current] if self.current is not None else [])
            self.active, self.current, self.cache = [], None, None
            again = self.last_death is not None and now - self.last_death < self.restart_window
            self.last_death = now
            if again or self.closed:
                self.stopped = e
                failed += self.pending
                self.pending.clear()
                self.queued_choices = 0
            self._fail(dict.fromkeys(failed), f"the server's decoding thread failed ({type(e).__name__}: {e})")
            if self.stopped is None:
                self.restarts += 1
                self.thread = self._spawn()
                log.error("the decoding thread was restarted")
        if self.stopped is not None and not self.closed:
            log.error("the decoding thread died twice in a row: stopped (the server needs a restart)")
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _fail(self, requests: Iterable[Request], error: BaseException | str) -> None:
        """Each request gets one Failure (its other choices stop); a consumer that fails to take it is logged."""
        if isinstance(error, BaseException):
            log.error(f"decoding failed: {type(error).__name__}: {error}", exc_info=error)
            error = f"{type(error).__name__}: {error}"
        for request in requests:
            try:
                request.fail(error)
            except Exception:
                log.exception("could not deliver a failure")

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.pending and not self.active:
                    self.cond.wait()
                if self.closed:
                    return
                if self.purge:
                    self._drop_cancelled()
                joining = self._take(self.max_batch_size - len(self.active))
            # Each round's work, cleanup after a failure included, in inference mode: torch refuses to update
            # inference tensors outside it. Not around the wait: a thread blocked inside it aborts the process
            # at exit.
            with torch.inference_mode():
                self._round(joining)

    def _round(self, joining: list[Request | tuple[Request, int]]) -> None:
        if self.cache is None:  # a restarted thread starts with a fresh cache
            self.cache = SlotCache(self.model, self.max_batch_size)
        for item in joining:
            self._start(item)
            self.current = None  # not on the way out of a dying thread: its request must hear
        self._leave([s for s in self.active if s.request.cancelled])
        if self.active:
            self._step()
        elif self.cache.k[0].shape[2] > 64:  # idle: give back the room a burst of long sequences took
            self.cache = SlotCache(self.model, self.max_batch_size)

    def _drop_cancelled(self) -> None:
        """Forget the waiting choices of cancelled requests (called with the lock held)."""
        self.purge = False
        for r in [r for r in self.pending if r.cancelled]:
            self.pending.remove(r)
            self.queued_choices -= r.cost if r.params.num_beams > 1 else r.choices - r.started

    def _take(self, room: int) -> list[Request | tuple[Request, int]]:
        """Up to `room` choices (request, index) from the head of the queue, or a beam search request."""
        out: list[Request | tuple[Request, int]] = []
        while self.pending and len(out) < room:
            r = self.pending[0]
            if r.params.num_beams > 1:
                self.pending.popleft()
                self.queued_choices -= r.cost
                out.append(r)
                continue
            out.append((r, r.started))
            r.started += 1
            self.queued_choices -= 1
            if r.started == r.choices:
                self.pending.popleft()
        return out

    def _start(self, item: Request | tuple[Request, int]) -> None:
        """Encode a newcomer's prompt and choose its first token; it joins the batch unless already done."""
        if isinstance(item, Request):
            return self._beams(item)
        request, index = item
        if request.cancelled:
            return
        self.current = request
        try:
            prompt = request.prompts[index // request.n]
            seq = Sequence(request, index, prompt, self.enc, self.vocab, self.device)
            idx = torch.tensor([prompt], device=self.device)
            kv = self.model.new_cache(1, len(prompt))
            p = seq.params
            # every position's logits only when echo shows the prompt's log-probabilities
            logits = self.model(idx, cache=kv, last_only=not p.echo)[0, :, : self.vocab].float()  # [P or 1, V]
            if p.echo:
                self._echo(seq, logits)
            if p.max_tokens == 0:
                seq.finish("length")
            elif self._choose([seq], logits[-1:])[0] is None:
                self.cache.put(len(self.active), kv, len(prompt))
                self.active.append(seq)
            seq.flush()
        except Exception as e:
            self._fail([request], e)

    def _echo(self, seq: Sequence, logits: torch.Tensor) -> None:
        """The prompt as the first piece of text (with its tokens' log-probabilities if asked for)."""
        text, tokens, n = "", [], seq.params.logprobs
        for i, t in enumerate(seq.prompt):
            if n is not None:
                info = self._logprob_info(logits[i - 1 : i], t, n) if i else TokenInfo(t, None, None, 0)
                info.offset = len(text)
                tokens.append(info)
            text += token_bytes(self.enc, t).decode("utf-8", errors="replace")
        seq.out.append(Piece(seq.index, decode_ids(self.enc, seq.prompt), tokens))

    def _logprob_info(self, logits: torch.Tensor, token: int, n: int) -> TokenInfo:
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        top = torch.topk(lp, n) if n else None
        alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
        return TokenInfo(token, float(lp[token]), alts, 0)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[str | None]:
        """Pick and take each row's next token from logits [B, V] under that row's settings; finish reasons
        (`_FAILED` for a row whose own work failed: only its request is failed).

        Plain greedy rows share one argmax: per-row work over the vocabulary is what a small model's
        step costs, and it would otherwise grow with the batch.
        """
        tokens: list[int | None] = [None] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if s.params.temperature == 0 and s.seen is None and s.counts is None]
        if plain:
            try:
                early = [j for j, i in enumerate(plain) if seqs[i].generated < seqs[i].params.min_tokens]
                x = logits if len(plain) == len(seqs) and not early else logits[plain]  # a copy, unless all plain
                if self.eos is not None and early:  # min_tokens: no EOS yet (the raw logits stay for logprobs)
                    x[early, self.eos] = -math.inf
                for i, t in zip(plain, x.argmax(-1).tolist(), strict=True):
                    tokens[i] = t
            except Exception as e:
                self._fail(dict.fromkeys(seqs[i].request for i in plain), e)
        shared = set(plain)
        for i, seq in enumerate(seqs):
            if i not in shared:
                try:
                    tokens[i] = self._sample(seq, logits[i : i + 1])
                except Exception as e:
                    self._fail([seq.request], e)
        reasons: list[str | None] = []
        for i, seq in enumerate(seqs):
            if tokens[i] is None:
                reasons.append(_FAILED)
                continue
            try:
                n = seq.params.logprobs
                info = self._logprob_info(logits[i : i + 1], tokens[i], n) if n is not None else None
                reasons.append(seq.accept(tokens[i], info, self.eos))
            except Exception as e:
                self._fail([seq.request], e)
                reasons.append(_FAILED)
        return reasons

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        """Penalise and sample one row [1, V] with its own settings and random stream."""
        p, x = seq.params, logits
        if seq.seen is not None:
            x = apply_repetition_penalty(x, seq.seen, p.repetition_penalty)
        if seq.counts is not None:  # OpenAI's rule, over the tokens generated so far
            x = x - seq.counts * p.frequency_penalty - (seq.counts > 0).float() * p.presence_penalty
        if self.eos is not None and seq.generated < p.min_tokens:
            x = mask_token(x, self.eos)
        return int(sample(x, p.temperature, p.top_k, p.top_p, seq.generator)[0])

    def _step(self) -> None:
        """One forward for every active sequence, then one token each; finished (or failed) ones leave."""
        batch = len(self.active)
        self.peak = max(self.peak, batch)
        try:
            mask, pos = self.cache.begin(batch)
            idx = torch.tensor([[s.last] for s in self.active], device=self.device)
            logits = self.model(idx, cache=self.cache, attn_mask=mask, pos_ids=pos)[:, -1, : self.vocab].float()
            self.cache.end()
        except Exception as e:
            # No one row to blame: the step's rows fail, and the cache (maybe half written) starts afresh.
            self._fail(dict.fromkeys(s.request for s in self.active), e)
            self.active = []
            self.cache = SlotCache(self.model, self.max_batch_size)
            return
        reasons = self._choose(self.active, logits)
        for seq, reason in zip(self.active, reasons, strict=True):
            if reason != _FAILED:
                try:
                    seq.flush()
                except Exception as e:  # the consumer's own failure
                    self._fail([seq.request], e)
        self._leave([s for s, r in zip(self.active, reasons, strict=True) if r is not None or s.request.cancelled])

    def _leave(self, seqs: list[Sequence]) -> None:
        """Free the rows of `seqs`: the last row moves into each hole, so rows [0, B) stay the active ones."""
        for seq in seqs:
            row, last = self.active.index(seq), len(self.active) - 1
            if row != last:
                self.cache.move(last, row)
                self.active[row] = self.active[last]
            self.active.pop()

    def _beams(self, request: Request) -> None:
        """Beam search runs alone (the batch waits): n best sequences per prompt, stop strings applied after.
        A cancelled request stops at the next step of the search."""
        p, vocab = request.params, self.vocab
        self.current = request

        def stop() -> bool:
            return request.cancelled or self.closed

        try:
            for i, prompt in enumerate(request.prompts):
                if stop():
                    return
                idx = torch.tensor([prompt], device=self.device)
                res = beam_search(
                    self.model, idx, p.max_tokens, p.num_beams, p.length_penalty, False, self.eos, request.n,
                    should_stop=stop, vocab_limit=self.vocab,
                )  # fmt: skip
                if stop():
                    return
                for j in range(request.n):
                    seq = Sequence(request, i * request.n + j, prompt, self.enc, vocab, self.device)
                    new = res.sequences[j, len(prompt) : len(prompt) + int(res.lengths[j])].tolist()
                    if p.echo:
                        seq.out.append(Piece(seq.index, decode_ids(self.enc, prompt), []))
                    reason = None
                    for t in new:
                        reason = seq.accept(t, None, self.eos)
                        if reason is not None:
                            break
                    if reason is None:
                        seq.finish("length")
                    seq.flush()
        except Exception as e:
            self._fail([request], e)
