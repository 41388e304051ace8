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
from .hub.sources import OPENAI_SHA256 as KNOWN_SHA256  # pinned hashes of OpenAI's released files

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


def _read_vocab(path: Path, raw: bytes, alphabet: dict[str, int]) -> dict[bytes, int]:
    """Token bytes -> id from encoder.json / vocab.json (without <|endoftext|>), every entry checked."""
    try:
        encoder = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Gpt2LoadError(f"{path} is not valid JSON ({e}): delete it and download again") from None
    if not isinstance(encoder, dict):
        raise Gpt2LoadError(f"{path} is not a JSON object of token -> id: delete it and download again")
    ranks: dict[bytes, int] = {}
    for tok, i in encoder.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise Gpt2LoadError(f"{path}: token {tok!r} has id {i!r}, not a whole number: download it again")
        if tok == EOT:
            continue
        try:
            ranks[bytes(alphabet[c] for c in tok)] = i
        except KeyError:
            raise Gpt2LoadError(f"{path}: token {tok!r} is not GPT-2 byte-level text: download it again") from None
    return ranks


def _ranks_from_merges(path: Path, raw: bytes, alphabet: dict[str, int]) -> dict[bytes, int]:
    """The ranks the merges imply: the 256 single bytes in GPT-2's order, then one new token per merge line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Gpt2LoadError(f"{path} is not UTF-8 text ({e}): delete it and download again") from None
    ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())}
    lines = [ln for ln in text.split("\n") if ln and not ln.startswith("#version")]
    for number, line in enumerate(lines, start=1):
        parts = line.split(" ")
        try:
            if len(parts) != 2 or not all(parts):
                raise KeyError
            token = bytes(alphabet[c] for c in parts[0] + parts[1])
        except KeyError:
            raise Gpt2LoadError(
                f"{path} line {number} ({line[:40]!r}) is not a merge of two GPT-2 tokens: download it again"
            ) from None
        if token in ranks:
            raise Gpt2LoadError(f"{path} line {number} repeats the merge {line!r}: download it again")
        ranks[token] = len(ranks)
    return ranks


def read_ranks(vocab_path: str | Path, merges_path: str | Path) -> dict[bytes, int]:
    """Mergeable ranks (token bytes -> id) from a GPT-2 vocabulary + merges pair.

    GPT-2's ids are its merge ranks, so the whole vocabulary must equal what the merges imply, token for token
    (the check tiktoken makes when it loads these files).
    """
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    raw_vocab, raw_merges = vocab_path.read_bytes(), merges_path.read_bytes()
    _check_hash(vocab_path, raw_vocab)
    _check_hash(merges_path, raw_merges)
    alphabet = _byte_alphabet()
    ranks = _read_vocab(vocab_path, raw_vocab, alphabet)
    implied = _ranks_from_merges(merges_path, raw_merges, alphabet)
    _check_agree(vocab_path, merges_path, ranks, implied)
    return ranks


def _check_agree(vocab_path: Path, merges_path: Path, ranks: dict[bytes, int], implied: dict[bytes, int]) -> None:
    if ranks != implied:
        if len(ranks) != len(implied):
            why = f"{len(ranks)} tokens, the merges make {len(implied)}"
        else:
            tok = next(t for t, i in implied.items() if ranks.get(t) != i)
            why = f"token {tok!r} has id {ranks.get(tok)}, the merges give it {implied[tok]}"
        raise Gpt2LoadError(f"{vocab_path} and {merges_path} do not belong together ({why}): download both again")


def encoding_from_lists(where: str | Path, tokens: list[str], merges: list[str]) -> tiktoken.Encoding:
    """GPT-2's encoding from its tokens in id order (<|endoftext|> among them) and its merge lines, as a GGUF
    file's `tokenizer.ggml.tokens` / `.merges` hold them: checked as `read_ranks` checks the files."""
    where, alphabet = Path(where), _byte_alphabet()
    if len(set(tokens)) != len(tokens):
        raise Gpt2LoadError(f"{where} lists a token twice in its vocabulary: get the file again")
    ranks = _read_vocab(where, json.dumps({t: i for i, t in enumerate(tokens)}).encode(), alphabet)
    _check_agree(where, where, ranks, _ranks_from_merges(where, "\n".join(merges).encode(), alphabet))
    specials = {EOT: tokens.index(EOT)}
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


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


def id_marker(token_id: int) -> str:
    """The visible stand-in for an id the tokenizer has no token for (a model with a padded vocabulary)."""
    return f"<|id:{token_id}|>"


def token_bytes(enc: tiktoken.Encoding, token_id: int) -> bytes:
    """The bytes of one token; an id outside the tokenizer (e.g. 50300 from a 50304-row model) gives
    `id_marker(id)` instead of raising, so generating from a padded-vocabulary model never crashes."""
    token_id = int(token_id)
    if 0 <= token_id < enc.n_vocab:
        try:
            return enc.decode_single_token_bytes(token_id)
        except KeyError:  # a gap in the id space
            pass
    return id_marker(token_id).encode()


def decode_ids(enc: tiktoken.Encoding, ids) -> str:
    """Text of a sequence of ids, as `enc.decode` gives it (invalid UTF-8 becomes U+FFFD), but with ids the
    tokenizer does not know shown as `<|id:N|>` markers instead of raising KeyError."""
    return b"".join(token_bytes(enc, i) for i in ids).decode("utf-8", errors="replace")


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Encode text, letting `<|endoftext|>` through as the special token (as the book does)."""
    return enc.encode(text, allowed_special={EOT})
