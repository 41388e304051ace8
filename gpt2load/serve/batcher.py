"""Continuous batching: one thread owns the model and decodes every active sequence with one forward per step.

Each sequence keeps its keys and values in one row of a shared `SlotCache`, left-aligned (its own positions
0..n-1), so rows of different lengths decode together: the new token of row b is written at column len_b, its
position is len_b, and the attention mask hides columns past it. A request joins at the next step (its prompt is
encoded alone, then copied into a free row) and leaves when done, freeing the row for the next in the queue.
"""

from __future__ import annotations

import collections
import logging
import math
import threading

import tiktoken
import torch

from ..beam import beam_search
from ..model import GPTModel, KVCache
from ..sampling import apply_repetition_penalty, mask_token, sample
from ..tokenizer import decode_ids, token_bytes
from .sequence import Failure, Piece, Request, Sequence, TokenInfo

log = logging.getLogger("gpt2load.serve")


class QueueFull(Exception):
    """More requests are waiting than `max_queue` allows."""


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


class Batcher:
    """Runs decode steps for every active sequence in a background thread; `submit` queues requests."""

    def __init__(self, model: GPTModel, enc: tiktoken.Encoding, max_batch_size: int = 8, max_queue: int = 64):
        self.model, self.enc = model, enc
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos = enc.eot_token if enc.eot_token < model.cfg.vocab_size else None
        self.cache = SlotCache(model, max_batch_size)
        self.active: list[Sequence] = []
        self.pending: collections.deque[Sequence | Request] = collections.deque()  # Request: a beam search
        self.cond = threading.Condition()
        self.closed = False
        self.peak = 0  # the most sequences decoded in one step so far
        self.thread = threading.Thread(target=self._run, name="gpt2load-batcher", daemon=True)
        self.thread.start()

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"active": len(self.active), "queued": self._waiting(), "peak_batch": self.peak}

    def _waiting(self) -> int:
        return len({id(s if isinstance(s, Request) else s.request) for s in self.pending})

    def submit(self, request: Request) -> None:
        """Queue a request's choices; raises QueueFull when `max_queue` requests already wait."""
        vocab = self.model.cfg.vocab_size
        with self.cond:
            if self._waiting() >= self.max_queue:
                raise QueueFull
            if request.params.num_beams > 1:
                self.pending.append(request)
            else:
                device = self.cache.device
                for p, prompt in enumerate(request.prompts):
                    for j in range(request.n):
                        self.pending.append(Sequence(request, p * request.n + j, prompt, self.enc, vocab, device))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.pending and not self.active:
                    self.cond.wait()
                if self.closed:
                    return
                joining = []
                while self.pending and len(self.active) + len(joining) < self.max_batch_size:
                    joining.append(self.pending.popleft())
            for item in joining:
                self._guarded(item, self._start)
            self._leave([s for s in self.active if s.request.cancelled])
            if self.active:
                self._guarded(None, self._step)
            elif self.cache.k[0].shape[2] > 64:  # idle: give back the room a burst of long sequences took
                self.cache = SlotCache(self.model, self.max_batch_size)

    def _guarded(self, item, fn) -> None:
        """Run fn(item); a failure fails the sequences involved, and the server goes on."""
        try:
            with torch.inference_mode():
                fn(item) if item is not None else fn()
        except Exception as e:
            log.exception("decoding failed")
            failed = [item] if item is not None else list(self.active)
            for s in failed:
                (s if isinstance(s, Request) else s.request).emit(Failure(f"{type(e).__name__}: {e}"))
            self._leave([s for s in failed if s in self.active])

    def _start(self, item: Sequence | Request) -> None:
        """Encode a newcomer's prompt and choose its first token; it joins the batch unless already done."""
        if isinstance(item, Request):
            return self._beams(item)
        seq = item
        if seq.request.cancelled:
            return
        idx = torch.tensor([seq.prompt], device=self.cache.device)
        kv = self.model.new_cache(1, len(seq.prompt))
        p = seq.params
        # every position's logits only when echo shows the prompt's log-probabilities
        logits = self.model(idx, cache=kv, last_only=not p.echo)[0].float()  # [P or 1, V]
        if p.echo:
            self._echo(seq, logits)
        if p.max_tokens == 0:
            seq.finish("length")
        elif self._choose([seq], logits[-1:])[0] is None:
            self.cache.put(len(self.active), kv, len(seq.prompt))
            self.active.append(seq)
        seq.flush()

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
        """Pick and take each row's next token from logits [B, V] under that row's settings; finish reasons.

        Plain greedy rows share one argmax: per-row work over the vocabulary is what a small model's
        step costs, and it would otherwise grow with the batch.
        """
        tokens = [0] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if s.params.temperature == 0 and s.seen is None and s.counts is None]
        if plain:
            early = [j for j, i in enumerate(plain) if seqs[i].generated < seqs[i].params.min_tokens]
            x = logits if len(plain) == len(seqs) and not early else logits[plain]  # a copy, unless all plain
            if self.eos is not None and early:  # min_tokens: no EOS yet (the raw logits stay for logprobs)
                x[early, self.eos] = -math.inf
            for i, t in zip(plain, x.argmax(-1).tolist(), strict=True):
                tokens[i] = t
        for i, seq in enumerate(seqs):
            if i not in plain:
                tokens[i] = self._sample(seq, logits[i : i + 1])
        reasons = []
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            info = self._logprob_info(logits[i : i + 1], tokens[i], n) if n is not None else None
            reasons.append(seq.accept(tokens[i], info, self.eos))
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
        """One forward for every active sequence, then one token each; finished ones leave."""
        batch = len(self.active)
        self.peak = max(self.peak, batch)
        mask, pos = self.cache.begin(batch)
        idx = torch.tensor([[s.last] for s in self.active], device=self.cache.device)
        logits = self.model(idx, cache=self.cache, attn_mask=mask, pos_ids=pos)[:, -1].float()
        self.cache.end()
        reasons = self._choose(self.active, logits)
        for seq in self.active:
            seq.flush()
        self._leave([s for s, r in zip(self.active, reasons, strict=True) if r is not None])

    def _leave(self, seqs: list[Sequence]) -> None:
        """Free the rows of `seqs`: the last row moves into each hole, so rows [0, B) stay the active ones."""
        for seq in seqs:
            row, last = self.active.index(seq), len(self.active) - 1
            if row != last:
                self.cache.move(last, row)
                self.active[row] = self.active[last]
            self.active.pop()

    def _beams(self, request: Request) -> None:
        """Beam search runs alone (the batch waits): n best sequences per prompt, stop strings applied after."""
        if request.cancelled:
            return
        p, vocab = request.params, self.model.cfg.vocab_size
        for i, prompt in enumerate(request.prompts):
            idx = torch.tensor([prompt], device=self.cache.device)
            res = beam_search(self.model, idx, p.max_tokens, p.num_beams, p.length_penalty, False, self.eos, request.n)
            for j in range(request.n):
                seq = Sequence(request, i * request.n + j, prompt, self.enc, vocab, self.cache.device)
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
