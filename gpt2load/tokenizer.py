"""GPT-2's byte-level BPE as a tiktoken Encoding, built offline from the files that come with the weights.

OpenAI ships `encoder.json` + `vocab.bpe`; Hugging Face ships the same data as `vocab.json` + `merges.txt`.
The encoder maps byte-level "printable" strings to token ids; tiktoken wants raw bytes -> rank, and GPT-2's
ids are its merge ranks, so the table converts directly. The merges file is used to check that.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import tiktoken

from .errors import Gpt2LoadError
from .sources import OPENAI_SHA256 as KNOWN_SHA256  # pinned hashes of OpenAI's released files

EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer regex (the same split as OpenAI's original, in possessive form).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# (vocabulary file, merges file), in the order they are looked for.
FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's reversible map of bytes to printable characters, inverted: character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def find_tokenizer_files(folder: str | Path) -> tuple[Path, Path] | None:
    folder = Path(folder)
    for vocab, merges in FILE_PAIRS:
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return folder / vocab, folder / merges
    return None


def _check_hash(path: Path, data: bytes) -> None:
    want = KNOWN_SHA256.get(path.name)
    if want and hashlib.sha256(data).hexdigest() != want:
        raise Gpt2LoadError(f"{path} does not match the sha256 of OpenAI's GPT-2 file: delete it and download again")


def read_ranks(vocab_path: str | Path, merges_path: str | Path) -> dict[bytes, int]:
    """Mergeable ranks (token bytes -> id) from a GPT-2 vocabulary + merges pair, checked for consistency."""
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    raw_vocab, raw_merges = vocab_path.read_bytes(), merges_path.read_bytes()
    _check_hash(vocab_path, raw_vocab)
    _check_hash(merges_path, raw_merges)
    try:
        encoder: dict[str, int] = json.loads(raw_vocab)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gpt2LoadError(f"{vocab_path} is not valid JSON ({e}): delete it and download again") from None
    alphabet = _byte_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in tok): i for tok, i in encoder.items() if tok != EOT}
    except KeyError:
        raise Gpt2LoadError(f"{vocab_path} is not a GPT-2 byte-level vocabulary") from None
    # Single bytes first, then one token per merge line, in order: ids must equal merge ranks.
    lines = [ln for ln in raw_merges.decode("utf-8").split("\n") if ln and not ln.startswith("#version")]
    if len(ranks) != 256 + len(lines):
        raise Gpt2LoadError(
            f"{vocab_path} has {len(ranks)} tokens but {merges_path} has {len(lines)} merges "
            "(expected 256 more tokens than merges): the files do not belong together"
        )
    for rank, line in enumerate(lines[:50], start=256):  # a cheap spot check of the ordering
        a, b = line.split(" ")
        if ranks.get(bytes(alphabet[c] for c in a + b)) != rank:
            raise Gpt2LoadError(
                f"{merges_path} line {rank - 255} disagrees with {vocab_path}: the files do not belong together"
            )
    return ranks


@lru_cache(maxsize=8)
def _encoding(vocab_path: str, merges_path: str) -> tiktoken.Encoding:
    ranks = read_ranks(vocab_path, merges_path)
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def tokenizer_from_folder(folder: str | Path) -> tiktoken.Encoding:
    """The GPT-2 encoding from the tokenizer files in `folder` (OpenAI or Hugging Face names)."""
    found = find_tokenizer_files(folder)
    if found is None:
        names = " or ".join(" + ".join(p) for p in FILE_PAIRS)
        raise Gpt2LoadError(f"no tokenizer files in {folder}: it needs {names}")
    return _encoding(str(found[0].resolve()), str(found[1].resolve()))


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Encode text, letting `<|endoftext|>` through as the special token (as the book does)."""
    return enc.encode(text, allowed_special={EOT})
