"""gpt2load.classify: the pooled position's probabilities, the same alone or in a padded batch."""

from __future__ import annotations

import pytest
import torch
from helpers import TOKENIZER_DIR
from torch import nn

from gpt2load.errors import Gpt2LoadError
from gpt2load.finetune.classify import classify
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.tokenizer import encode, tokenizer_from_folder

ENC = tokenizer_from_folder(TOKENIZER_DIR)
TEXTS = ["a short one", "a rather longer text than the first, with a comma", "x"]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    m = GPTModel(GPTConfig(vocab_size=50257, context_length=24, emb_dim=16, n_heads=2, n_layers=2))
    m.out_head = nn.Linear(16, 3)
    return m.eval()


def probs_alone(model: GPTModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids]))[0, -1], -1)


def test_last_real_is_each_text_alone(model):
    results = classify(model, ENC, TEXTS, ["neg", "neutral", "pos"], batch_size=2)
    assert len(results) == 3
    for text, r in zip(TEXTS, results, strict=True):
        want = probs_alone(model, encode(ENC, text))
        got = torch.tensor([r["probs"][k] for k in ("neg", "neutral", "pos")])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert r["label"] == ("neg", "neutral", "pos")[int(want.argmax())]


def test_last_pools_after_padding_to_max_length(model):
    (r,) = classify(model, ENC, TEXTS[0], pool="last", max_length=10)
    want = probs_alone(model, encode(ENC, TEXTS[0]) + [50256] * (10 - len(encode(ENC, TEXTS[0]))))
    torch.testing.assert_close(torch.tensor([r["probs"][str(i)] for i in range(3)]), want, atol=1e-5, rtol=0)


def test_long_texts_are_cut_with_a_notice(model, capsys):
    (r,) = classify(model, ENC, "word " * 40, max_length=8)
    want = probs_alone(model, encode(ENC, "word " * 40)[:8])
    torch.testing.assert_close(torch.tensor(list(r["probs"].values())), want, atol=1e-5, rtol=0)
    assert "longer than 8 tokens" in capsys.readouterr().err


def test_errors(model):
    with pytest.raises(Gpt2LoadError, match="2 label names"):
        classify(model, ENC, "hi", ["a", "b"])
    with pytest.raises(Gpt2LoadError, match="non-empty"):
        classify(model, ENC, [""])
    with pytest.raises(Gpt2LoadError, match="--pool"):
        classify(model, ENC, "hi", pool="first")
    lm = GPTModel(GPTConfig(vocab_size=50257, context_length=8, emb_dim=8, n_heads=2, n_layers=1))
    with pytest.raises(Gpt2LoadError, match="language-model head"):
        classify(lm, ENC, "hi")
