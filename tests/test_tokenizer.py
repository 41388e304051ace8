"""The offline GPT-2 tokenizer against known ids and transformers' GPT2Tokenizer on the same files."""

import json
import shutil

import pytest
from helpers import TOKENIZER_DIR, add_tokenizer
from transformers import GPT2Tokenizer

from gpt2load.errors import Gpt2LoadError
from gpt2load.tokenizer import EOT_ID, decode_ids, encode, token_bytes, tokenizer_from_folder

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


def test_ids_outside_the_tokenizer_decode_as_visible_markers(enc):
    """A padded-vocabulary model (nanoGPT's 50304 rows) can emit ids the tokenizer has no token for."""
    with pytest.raises(KeyError):
        enc.decode([50300])  # what tiktoken itself does: the crash decode_ids exists to avoid
    assert decode_ids(enc, [15496, 50300, 995]) == "Hello<|id:50300|> world"
    assert decode_ids(enc, [50303, -1]) == "<|id:50303|><|id:-1|>"
    assert token_bytes(enc, 50257) == b"<|id:50257|>" and token_bytes(enc, 50256) == b"<|endoftext|>"
    # A character split over two tokens still joins when it is whole, as with enc.decode.
    smile = encode(enc, "🙂")
    assert len(smile) == 2 and decode_ids(enc, smile) == enc.decode(smile) == "🙂"
    broken = decode_ids(enc, [smile[0], 50299, smile[1]])  # a marker between the halves: U+FFFD, as enc.decode
    assert broken.startswith("\ufffd<|id:50299|>\ufffd") and set(broken) - set("<|id:50299>") == {"\ufffd"}


def test_the_whole_vocabulary_is_checked_against_the_merges(tmp_path):
    """Two merges swapped far past the start: every pair is compared, not a prefix."""
    shutil.copyfile(TOKENIZER_DIR / "encoder.json", tmp_path / "vocab.json")
    lines = (TOKENIZER_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[40000], lines[40001] = lines[40001], lines[40000]
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(
        Gpt2LoadError, match=r"do not belong together \(token .* has id 4025\d, the merges give it 4025\d"
    ):
        tokenizer_from_folder(tmp_path)
