"""Fine-tuning data: classification tables (CSV/TSV with `text` and `label`) and Alpaca-style instruction
JSON, turned into (input, target) batches that the training loop's ordinary -100-aware loss handles.

A classification batch is the padded texts and a target row of -100 everywhere except the pooled position,
which holds the class index: cross-entropy over it is the book's loss on `logits[:, -1, :]` (or on the last
real token), with no special case in the loop. An instruction batch is the book's chapter-7 collate.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..generation.templates import format_example, format_instruction
from ..tokenizer import EOT_ID, encode

IGNORE_INDEX = -100  # targets cross-entropy skips
PAD_ID = EOT_ID  # the book pads with <|endoftext|>
POOLS = ("last", "last-real")
TEXT_COLUMN, LABEL_COLUMN = "text", "label"
_DELIMITERS = {".tsv": "\t", ".tab": "\t", ".csv": ","}
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: "١" is a name, not the integer 1
_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")  # an integer label written as a class index (at most 999999)
MAX_CLASSES = 65536  # more than GPT-2's vocabulary: a larger head is a wrong column, not a classifier


def notice(message: str) -> None:
    """Something the user should know that is not an error (e.g. truncated texts)."""
    print(f"gpt2load: notice: {message}", file=sys.stderr, flush=True)


def _read_text(path: Path, what: str) -> str:
    """The file's text, line ends untouched (newline=""), so that only the csv module decides where rows end."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise Gpt2LoadError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise Gpt2LoadError(f"{what} {path} is a folder: give a file") from None
    except UnicodeDecodeError as e:
        raise Gpt2LoadError(f"{what} {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if not text.strip():
        raise Gpt2LoadError(f"{what} {path} is empty")
    return text


# ---------------------------------------------------------------- classification tables


def read_table(path: str | Path, what: str = "the data file") -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV or TSV file with a header holding `text` and `label` columns.

    The delimiter follows the extension (.tsv/.tab: tab, .csv: comma); other names are sniffed from the
    header line. Rows end where the csv module says (\\n, \\r, \\r\\n outside quotes), never at the other
    characters str.splitlines breaks at (U+0085, U+2028, form feed...), which csv.writer leaves unquoted inside
    texts. Labels are kept as written (strings, stripped).
    """
    path = Path(path)
    text = _read_text(path, what)
    header = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    delim = _DELIMITERS.get(path.suffix.lower(), "\t" if "\t" in header and "," not in header else ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    texts, labels = [], []
    try:
        columns = [c.strip().lower() for c in next(reader)]
        missing = [c for c in (TEXT_COLUMN, LABEL_COLUMN) if c not in columns]
        if missing:
            raise Gpt2LoadError(
                f"{what} {path} has no {' and no '.join(repr(c) for c in missing)} column (its header is "
                f"{', '.join(columns)}): the first line must name a 'text' and a 'label' column"
            )
        ti, li = columns.index(TEXT_COLUMN), columns.index(LABEL_COLUMN)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            line = reader.line_num
            if len(row) <= max(ti, li) or not row[li].strip():
                raise Gpt2LoadError(f"{what} {path} line {line} has no label: every row needs a text and a label")
            if not row[ti].strip():
                raise Gpt2LoadError(f"{what} {path} line {line} has an empty text")
            texts.append(row[ti])
            labels.append(row[li].strip())
    except csv.Error as e:
        raise Gpt2LoadError(f"{what} {path} line {reader.line_num} is not valid CSV/TSV: {e}") from None
    if not texts:
        raise Gpt2LoadError(f"{what} {path} has a header but no examples")
    return texts, labels


def _shown(labels: Sequence[str], limit: int = 5) -> str:
    """Labels for a message: the first few, each cut to 30 characters (a label can be a whole paragraph)."""
    cut = [repr(x if len(x) <= 30 else x[:27] + "...") for x in labels[:limit]]
    return ", ".join(cut) + (", ..." if len(labels) > limit else "")


def make_label_names(
    labels: Sequence[str], num_classes: int | None = None, where: str = "the training data"
) -> list[str]:
    """The class names in index order, from the training labels (one per example).

    Labels are compared as written. When every label is a non-negative integer written plainly (0, 1, 17: no
    sign, no leading zero) and the largest is below the number of examples (or `num_classes`), labels are
    their own class index, so classes 0..N-1 exist even if some are absent from the data. Otherwise every
    label is a name, numbered in sorted order (numerically when all are integers): a label 100000000000 names
    one class, it does not ask for 10^11 of them. The same integer written two ways ("1" and "01") is an error,
    as is a class count above MAX_CLASSES.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise Gpt2LoadError(f"--num-classes must be an integer, got {num_classes!r}")
    if num_classes is not None and not 2 <= num_classes <= MAX_CLASSES:
        raise Gpt2LoadError(
            f"--num-classes {num_classes}: a classifier needs at least 2 classes and gpt2load allows at most "
            f"{MAX_CLASSES}"
        )
    seen = sorted(set(labels))
    integers = all(_INTEGER.fullmatch(x) for x in seen)
    if integers:
        by_value: dict[Decimal, str] = {}
        for x in seen:  # (Decimal: no limit on digits, unlike int)
            if by_value.setdefault(Decimal(x), x) != x:
                raise Gpt2LoadError(
                    f"{where} writes one label both as {by_value[Decimal(x)]!r} and as {x!r}: labels are "
                    "compared as written, so write each label the same way everywhere"
                )
        seen = sorted(seen, key=Decimal)
    bound = max(len(labels), num_classes or 0)
    if integers and all(_INDEX.fullmatch(x) for x in seen) and int(seen[-1]) < bound:
        needed = int(seen[-1]) + 1
        names = [str(i) for i in range(max(needed, num_classes or 0))]
    else:
        needed = len(seen)
        names = list(seen)
    if len(names) > MAX_CLASSES:
        raise Gpt2LoadError(
            f"{where} has {len(names)} different labels, more than the {MAX_CLASSES} classes gpt2load builds a "
            "head for: check that the 'label' column holds the classes"
        )
    if num_classes is not None and num_classes < needed:
        raise Gpt2LoadError(
            f"--num-classes {num_classes} is too few for {where}, whose labels need {needed} "
            f"({_shown(seen)}): raise it or leave it out"
        )
    if num_classes is not None and num_classes > len(names):
        raise Gpt2LoadError(
            f"--num-classes {num_classes} but {where} has {len(names)} labels ({_shown(names)}), and classes "
            "without a name can only be integer labels 0..N-1: leave --num-classes out"
        )
    if len(names) < 2:
        raise Gpt2LoadError(f"{where} has only the label {_shown(names)}: a classifier needs at least 2 classes")
    return names


def label_indices(labels: Sequence[str], names: Sequence[str], where: str) -> list[int]:
    """Class indices of `labels`; a label training never saw is an error naming it."""
    index = {name: i for i, name in enumerate(names)}
    unseen = sorted({x for x in labels if x not in index})
    if unseen:
        values = {Decimal(n): n for n in names if _INTEGER.fullmatch(n)}
        for u in unseen:
            if _INTEGER.fullmatch(u) and Decimal(u) in values:
                raise Gpt2LoadError(
                    f"{where} writes the label {values[Decimal(u)]!r} as {_shown([u])}: labels are compared as "
                    "written, so write it as the training data does"
                )
        raise Gpt2LoadError(
            f"{where} has labels the training data does not: {_shown(unseen)} "
            f"(known: {_shown(names, 10)}): fix the labels or add examples of them to the training data"
        )
    return [index[x] for x in labels]


def encode_texts(enc, texts: Sequence[str], max_length: int, where: str) -> list[list[int]]:
    """Token ids of each text, cut to `max_length` tokens (keeping the start) with one notice."""
    ids = [encode(enc, t) for t in texts]
    long = sum(len(x) > max_length for x in ids)
    if long:
        notice(
            f"{long} of {len(ids)} texts in {where} are longer than {max_length} tokens (--max-length); "
            f"only their first {max_length} tokens are used"
        )
    return [x[:max_length] for x in ids]


def pool_positions(lengths: Sequence[int], width: int, pool: str) -> torch.Tensor:
    """The position each row is classified at: the last of the padded row (the book) or its last real token."""
    if pool not in POOLS:
        raise Gpt2LoadError(f"--pool {pool!r} is not one of {', '.join(POOLS)}")
    if pool == "last":
        return torch.full((len(lengths),), width - 1, dtype=torch.long)
    return torch.tensor(lengths, dtype=torch.long) - 1


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int = PAD_ID) -> torch.Tensor:
    """int64 [len(rows), width]: each row followed by pad_id."""
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


@dataclass
class ClassificationData:
    """Encoded texts and class indices; `gather` makes the (input, target) batches WindowLoader serves.

    Every batch is padded to `width` (the book pads every text to the longest training text), so the `last`
    pool sees the same padding in training and at prediction time.
    """

    ids: list[list[int]]
    labels: list[int]
    width: int
    pool: str = "last-real"

    def __len__(self) -> int:
        return len(self.ids)

    def gather(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.ids[int(i)] for i in index]
        x = pad_rows(rows, self.width)
        y = torch.full_like(x, IGNORE_INDEX)
        pos = pool_positions([len(r) for r in rows], self.width, self.pool)
        y[torch.arange(len(rows)), pos] = torch.tensor([self.labels[int(i)] for i in index], dtype=torch.long)
        return x, y


# ---------------------------------------------------------------- instruction data (Alpaca JSON)


_JSON_KINDS = {type(None): "null", bool: "true/false", int: "a number", float: "a number", list: "a list"}


def read_instructions(path: str | Path, what: str = "the instruction data") -> list[dict[str, str]]:
    """Records {"instruction", "input", "output"} from a JSON list (Alpaca format).

    Each field is a string; `input` may be absent (taken as ""). null, numbers, lists or objects in a field are
    an error naming the record (its index in the list, from 0).
    """
    path = Path(path)
    text = _read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Gpt2LoadError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:  # the C decoder guards its recursion: a clean error, the interpreter intact
        raise Gpt2LoadError(
            f"{what} {path} nests lists or objects too deeply to read: records are objects whose fields are texts"
        ) from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise Gpt2LoadError(f"{what} {path} holds a number JSON cannot read ({str(e).split(';')[0]})") from None
    if not isinstance(data, list) or not data:
        raise Gpt2LoadError(
            f'{what} {path} must be a non-empty JSON list of {{"instruction", "input", "output"}} records'
        )
    records = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise Gpt2LoadError(f"{what} {path}: record {i} is {_JSON_KINDS.get(type(rec), 'a string')}, not an object")
        missing = [k for k in ("instruction", "output") if k not in rec]
        if missing:
            raise Gpt2LoadError(f"{what} {path}: record {i} has no {' and no '.join(missing)}")
        fields = {k: rec.get(k, "") for k in ("instruction", "input", "output")}
        for k, v in fields.items():
            if not isinstance(v, str):
                kind = _JSON_KINDS.get(type(v), "an object")
                empty = ', or "" for none' if k == "input" else ""
                raise Gpt2LoadError(
                    f"{what} {path}: record {i} has an {k} that is not text but {kind}: write a string{empty}"
                )
        records.append(fields)
    return records


@dataclass
class InstructionData:
    """Each record as template tokens (without the closing <|endoftext|>, which the collate adds) and the
    length of its prompt part; `gather` is the book's collate."""

    ids: list[list[int]]
    prompt_lengths: list[int]
    mask_prompt: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def gather(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.ids[int(i)] for i in index]
        prompts = [self.prompt_lengths[int(i)] for i in index] if self.mask_prompt else None
        return instruction_collate(rows, prompts)


def encode_instructions(
    enc, records: Sequence[dict[str, str]], max_length: int, where: str, mask_prompt: bool = False
) -> InstructionData:
    """Template-format and encode records; examples longer than `max_length` tokens are cut (one notice)."""
    ids, prompts = [], []
    for r in records:
        ids.append(encode(enc, format_example(r["instruction"], r["input"], r["output"])))
        prompts.append(len(encode(enc, format_instruction(r["instruction"], r["input"]))))
    long = sum(len(x) > max_length for x in ids)
    if long:
        notice(
            f"{long} of {len(ids)} examples in {where} are longer than {max_length} tokens (--max-length); "
            f"only their first {max_length} tokens are trained on"
        )
    return InstructionData([x[:max_length] for x in ids], prompts, mask_prompt)


def instruction_collate(
    rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's chapter-7 collate: each row + <|endoftext|>, padded with 50256 to the longest; inputs are
    all but the last token, targets all but the first. Every pad target after the first (the <|endoftext|>
    the model must learn to write) is -100. With `prompt_lengths`, targets inside the prompt are -100 too
    (the book's exercise 7.2), so only the response and its <|endoftext|> count."""
    width = max(len(r) for r in rows) + 1
    seq = pad_rows([[*r, PAD_ID] for r in rows], width)
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    for i, r in enumerate(rows):
        y[i, len(r) :] = IGNORE_INDEX  # target len(r) - 1 is the closing <|endoftext|>
        if prompt_lengths is not None:
            y[i, : prompt_lengths[i] - 1] = IGNORE_INDEX  # targets that are prompt tokens
    return x, y


__all__ = [
    "ClassificationData",
    "InstructionData",
    "encode_instructions",
    "encode_texts",
    "instruction_collate",
    "label_indices",
    "make_label_names",
    "read_instructions",
    "read_table",
]
