"""The offline GPT-2 tokenizer against known ids and transformers' GPT2Tokenizer on the same files."""

import json
import shutil

import pytest
from helpers import TOKENIZER_DIR, add_tokenizer
from transformers import GPT2Tokenizer

from gpt2load.errors import Gpt2LoadError
from gpt2load.tokenizer import EOT_ID, encode, tokenizer_from_folder

TEXTS = [
    "Hello world",
    "Every effort moves you",
    "It's  a   test.\n\n\tTabs, 'quotes' and they're we'll I'd\r\n",
    "naïve café — 日本語, emoji 🙂 and numbers 3.14159 1,000,000",
    " leading space and trailing space ",
]


@pytest.fixture(scope="module")
def enc():
    return tokenizer_from_folder(TOKENIZER_DIR)


def test_known_ids(enc):
    assert encode(enc, "Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_ID == 50256
    assert enc.decode([15496, 995]) == "Hello world"


def test_endoftext_is_one_special_token(enc):
    assert encode(enc, "a<|endoftext|>b") == [64, 50256, 65]
    assert enc.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(enc, text):
    merges = [tuple(ln.split()) for ln in (TOKENIZER_DIR / "vocab.bpe").read_text().split("\n")[1:] if ln]
    ref = GPT2Tokenizer(vocab=json.loads((TOKENIZER_DIR / "encoder.json").read_text()), merges=merges)
    assert encode(enc, text) == ref.encode(text)
    assert enc.decode(encode(enc, text)) == text


def test_hugging_face_file_names_work(tmp_path):
    add_tokenizer(tmp_path, ("vocab.json", "merges.txt"))
    enc = tokenizer_from_folder(tmp_path)
    assert encode(enc, "Hello world") == [15496, 995]


def test_tampered_file_fails_its_hash(tmp_path):
    add_tokenizer(tmp_path)
    raw = (tmp_path / "vocab.bpe").read_bytes()
    (tmp_path / "vocab.bpe").write_bytes(raw.replace(b"\xc4\xa0 t", b"\xc4\xa0 q", 1))
    with pytest.raises(Gpt2LoadError, match=r"vocab.bpe does not match the sha256"):
        tokenizer_from_folder(tmp_path)


def test_mismatched_pair_is_refused(tmp_path):
    shutil.copyfile(TOKENIZER_DIR / "encoder.json", tmp_path / "vocab.json")
    lines = (TOKENIZER_DIR / "vocab.bpe").read_text().split("\n")
    (tmp_path / "merges.txt").write_text("\n".join(lines[:1] + lines[2:]))  # one merge missing
    with pytest.raises(Gpt2LoadError, match="do not belong together"):
        tokenizer_from_folder(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(Gpt2LoadError, match=r"no tokenizer files.*encoder.json \+ vocab.bpe"):
        tokenizer_from_folder(tmp_path)
