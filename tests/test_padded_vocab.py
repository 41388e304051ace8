"""A vocabulary padded past the tokenizer's (llm.c pads to a multiple of 128, nanoGPT to 50304) has rows that
are no tokens: zero rows score 0, above a trained model's (negative) logits, so every decoder must leave them out."""

from __future__ import annotations

import pytest
import torch
from helpers import TOKENIZER_DIR
from test_serve_batcher import run

from gpt2load import GPTConfig, GPTModel, complete, generate
from gpt2load.fast.backend import accelerate
from gpt2load.serve.batcher import Batcher
from gpt2load.serve.sequence import SamplingParams
from gpt2load.tokenizer import tokenizer_from_folder

REAL, PADDED = 50257, 50304


@pytest.fixture(scope="module")
def enc():
    return tokenizer_from_folder(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model():
    """Every real token's logit negative (a constant final hidden state c, real rows along -c), the padding
    rows zero as llm.c writes them: argmax over all rows is always a padding id."""
    torch.manual_seed(0)
    m = GPTModel(GPTConfig(vocab_size=PADDED, context_length=64, emb_dim=16, n_heads=2, n_layers=1)).eval()
    c = torch.randn(16)
    with torch.no_grad():
        m.final_norm.scale.zero_()
        m.final_norm.shift.copy_(c)
        rows = -c * (0.5 + torch.rand(REAL, 1)) - 0.01 * torch.randn(REAL, 16)
        m.tok_emb.weight[:REAL] = rows
        m.tok_emb.weight[REAL:] = 0
    return accelerate(m)


def test_the_padding_would_win_without_the_limit(model):
    assert int(generate(model, torch.tensor([[464, 3290]]), 1)[0, -1]) >= REAL  # the test model is as meant


def test_complete_never_chooses_a_padding_id(model, enc):
    for kwargs in ({}, {"temperature": 1.0, "seed": 1}, {"num_beams": 3}, {"repetition_penalty": 1.3}):
        out = complete(model, enc, "Every effort moves you", max_new_tokens=6, **kwargs)
        ids = out["completions"][0]["token_ids"]
        assert ids and max(ids) < REAL, (kwargs, ids)


def test_the_server_never_chooses_a_padding_id(model, enc):
    batcher = Batcher(model, enc, max_batch_size=4)
    try:
        plain = SamplingParams(max_tokens=5, temperature=0.0, logprobs=0)
        penalised = SamplingParams(max_tokens=5, temperature=0.7, seed=3, presence_penalty=0.5, logprobs=0)
        outs = run(batcher, [[464, 3290], [15496, 11]], [plain, penalised])
    finally:
        batcher.close()
    for ids in outs:
        assert len(ids) == 5 and max(ids) < REAL, ids
