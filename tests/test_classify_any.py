"""`gpt2load classify` / classify_texts on any classifier: the book's chapter-6 model (a new
`out_head = nn.Linear(d, 2)`, saved with `torch.save(model.state_dict())`, no gpt2load metadata), named with
--labels or numbered, pooled as the book does (--pool last) or at the last real token, the defaults noted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TOKENIZER_DIR, add_tokenizer, assert_clean_error, run_cli

import gpt2load
from gpt2load.errors import Gpt2LoadError
from gpt2load.finetune.classify import classify_texts
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.tokenizer import tokenizer_from_folder

CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=48, n_heads=3, n_layers=2)
TEXTS = ["You are a winner! Claim your prize now", "See you at lunch?"]
MAX_LENGTH = 12


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """(the book's chapter-6 classifier file, the model), and an ordinary language model's file beside it."""
    folder = add_tokenizer(tmp_path_factory.mktemp("classifier"))
    torch.manual_seed(0)
    model = GPTModel(CFG)
    model.out_head = torch.nn.Linear(CFG.emb_dim, 2)  # the book's classification head
    model.eval()
    torch.save(model.state_dict(), folder / "review_classifier.pth")
    torch.save(GPTModel(CFG).state_dict(), folder / "lm.pth")
    return folder / "review_classifier.pth", model


@torch.no_grad()
def book_probs(model, pool: str) -> list[list[float]]:
    """The book's classify_review (pad to max_length with <|endoftext|>, read the last position), or the last
    real token of each unpadded text."""
    enc = tokenizer_from_folder(TOKENIZER_DIR)
    out = []
    for text in TEXTS:
        ids = enc.encode(text)[:MAX_LENGTH]
        if pool == "last":
            ids = ids + [50256] * (MAX_LENGTH - len(ids))
        out.append(torch.softmax(model(torch.tensor([ids]))[:, -1, :], dim=-1)[0].tolist())
    return out


def _cli(path, *extra):
    texts = [a for t in TEXTS for a in ("--text", t)]
    return run_cli("classify", "--model", str(path), "--n-heads", "3", *texts, "--json", "--device", "cpu", *extra)


def test_cli_book_classifier_with_labels_and_the_books_pool(book):
    path, model = book
    proc = _cli(path, "--labels", "ham,spam", "--pool", "last", "--max-length", str(MAX_LENGTH))
    assert proc.returncode == 0, proc.stderr
    assert "notice" not in proc.stderr  # everything was given
    results = json.loads(proc.stdout)["results"]
    for r, want in zip(results, book_probs(model, "last"), strict=True):
        assert list(r["probs"]) == ["ham", "spam"]
        assert r["probs"]["ham"] == pytest.approx(want[0], abs=1e-5)
        assert r["label"] == ("ham" if want[0] > want[1] else "spam")


def test_cli_book_classifier_defaults_are_noted(book):
    path, model = book
    proc = _cli(path)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and notes[0].startswith("gpt2load: notice:"), proc.stderr
    assert "labels 0..1" in notes[0] and "pool last-real" in notes[0] and "--pool last" in notes[0]
    results = json.loads(proc.stdout)["results"]
    for r, want in zip(results, book_probs(model, "last-real"), strict=True):
        assert list(r["probs"]) == ["0", "1"]
        assert r["probs"]["1"] == pytest.approx(want[1], abs=1e-5)
    text = run_cli("classify", "--model", str(path), "--n-heads", "3", "--text", TEXTS[0], "--labels", "ham,spam")
    assert text.returncode == 0 and text.stdout.startswith(("ham\t", "spam\t")), text.stderr
    assert "labels 0..1" not in text.stderr and "pool last-real" in text.stderr


def test_cli_wrong_labels_are_one_line(book):
    path, _ = book
    assert_clean_error(_cli(path, "--labels", "ham,spam,eggs"), "names 3 classes", "has 2 outputs", "give 2")
    assert_clean_error(_cli(path, "--labels", "ham,ham"), "give 2 different names")
    assert_clean_error(_cli(path, "--labels", "ham,"), "empty name")
    assert_clean_error(_cli(path, "--max-length", "0"), "max_length")
    lm = path.parent / "lm.pth"
    assert_clean_error(_cli(lm), "language-model head", "not a classifier")


def test_api_book_classifier(book, capsys):
    path, model = book
    got = classify_texts(path, TEXTS, n_heads=3, labels=["ham", "spam"], pool="last", max_length=MAX_LENGTH)
    assert capsys.readouterr().err == ""
    for r, want in zip(got["results"], book_probs(model, "last"), strict=True):
        assert r["probs"]["spam"] == pytest.approx(want[1], abs=1e-5)
    numbered = classify_texts(path, TEXTS, n_heads=3)
    assert "records no classifier settings" in capsys.readouterr().err
    assert list(numbered["results"][0]["probs"]) == ["0", "1"]
    # gpt2load.classify on the loaded model gives the same as the book's loop
    net = gpt2load.load_gpt2(path, device="cpu", n_heads=3)
    enc = gpt2load.load_tokenizer(path)
    direct = gpt2load.classify(net, enc, TEXTS, ["ham", "spam"], pool="last", max_length=MAX_LENGTH)
    assert direct == got["results"]
    with pytest.raises(Gpt2LoadError, match="repeat a name"):
        gpt2load.classify(net, enc, TEXTS, ["a", "a"])
    with pytest.raises(Gpt2LoadError, match="names 1 classes"):
        classify_texts(path, TEXTS, n_heads=3, labels=["only"])
    with pytest.raises(Gpt2LoadError, match="pool"):
        classify_texts(path, TEXTS, n_heads=3, pool="first")
