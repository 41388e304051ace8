"""The continuous batcher in-process: rows joining and leaving mid-flight decode exactly as a plain loop does."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import TOKENIZER_DIR, served_model

from gpt2load import GPTConfig
from gpt2load.serve.batcher import Batcher
from gpt2load.serve.sequence import Failure, Finish, Piece, Request, SamplingParams
from gpt2load.tokenizer import EOT_ID, tokenizer_from_folder

TINY = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2)


@pytest.fixture(scope="module")
def model():
    return served_model(TINY)


@pytest.fixture(scope="module")
def enc():
    return tokenizer_from_folder(TOKENIZER_DIR)


def run(batcher: Batcher, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Submit every request at once; the token ids of each one's single choice."""
    out: list[list[int]] = [[] for _ in prompts]
    left = threading.Semaphore(0)

    def emit_for(i):
        def emit(event):
            if isinstance(event, Piece):
                out[i] += [t.id for t in event.tokens]
            elif isinstance(event, (Finish, Failure)):
                assert not isinstance(event, Failure), event.message
                left.release()

        return emit

    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        batcher.submit(Request([p], 1, sp, emit_for(i)))
    for _ in prompts:
        assert left.acquire(timeout=120)
    return out


def plain_loop(model, prompt: list[int], steps: int, penalise=None) -> list[int]:
    """The reference: the whole sequence through the model at every step, no cache, argmax."""
    idx, new, counts = torch.tensor([prompt]), [], torch.zeros(TINY.vocab_size)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(idx)[0, -1]
            if penalise is not None:
                logits = penalise(logits, counts, idx[0])
            t = int(logits.argmax())
            if t == EOT_ID:
                break
            new.append(t)
            counts[t] += 1
            idx = torch.cat([idx, torch.tensor([[t]])], 1)
    return new


def test_rows_that_join_and_leave_decode_as_alone(model, enc):
    batcher = Batcher(model, enc, max_batch_size=3, max_queue=16)
    try:
        prompts = [list(range(100 + i, 100 + 3 * i + 1)) for i in range(7)]  # lengths 1, 3, 5, ... 13
        lengths = [20, 3, 11, 7, 15, 2, 9]  # rows finish at different steps, so later ones move into holes
        params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=0) for n in lengths]
        together = run(batcher, prompts, params)
        assert batcher.stats()["peak_batch"] == 3
        for p, n, got in zip(prompts, lengths, together, strict=True):
            assert got == plain_loop(model, p, n)
        assert run(batcher, prompts[:1], params[:1]) == together[:1]  # alone
    finally:
        batcher.close()


def test_openai_presence_and_frequency_penalties_and_repetition_penalty(model, enc):
    batcher = Batcher(model, enc, max_batch_size=4)
    try:
        prompt = [464, 3797, 3332, 319, 262]
        openai_rule = SamplingParams(max_tokens=15, temperature=0.0, logprobs=0, presence_penalty=0.4)
        openai_rule.frequency_penalty = 0.7
        rep = SamplingParams(max_tokens=15, temperature=0.0, logprobs=0, repetition_penalty=1.5)
        got_openai, got_rep = run(batcher, [prompt, prompt], [openai_rule, rep])

        def openai_penalty(logits, counts, seq):
            return logits - 0.7 * counts - 0.4 * (counts > 0).float()

        def repetition(logits, counts, seq):  # transformers' rule over prompt and generated tokens
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[seq] = True
            return torch.where(seen, torch.where(logits < 0, logits * 1.5, logits / 1.5), logits)

        assert got_openai == plain_loop(model, prompt, 15, openai_penalty)
        assert got_rep == plain_loop(model, prompt, 15, repetition)
        assert got_openai != plain_loop(model, prompt, 15)  # the penalties did change something
    finally:
        batcher.close()
