"""Fine-tuning data: the Alpaca template byte for byte, the book's collate, --mask-prompt, classification tables."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TOKENIZER_DIR

from gpt2load.errors import Gpt2LoadError
from gpt2load.finetune.data import (
    IGNORE_INDEX,
    ClassificationData,
    encode_instructions,
    encode_texts,
    instruction_collate,
    label_indices,
    make_label_names,
    read_instructions,
    read_table,
)
from gpt2load.generation.templates import format_example, format_instruction
from gpt2load.tokenizer import encode, tokenizer_from_folder

ENC = tokenizer_from_folder(TOKENIZER_DIR)
PREAMBLE = b"Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_template_is_the_books_byte_for_byte():
    with_input = format_example("Convert to passive voice.", "The chef cooks the meal.", "The meal is cooked.")
    assert with_input.encode() == (
        PREAMBLE + b"\n\n### Instruction:\nConvert to passive voice."
        b"\n\n### Input:\nThe chef cooks the meal."
        b"\n\n### Response:\nThe meal is cooked."
    )
    without = format_instruction("Name a colour.")
    assert without.encode() == PREAMBLE + b"\n\n### Instruction:\nName a colour.\n\n### Response:\n"


def test_collate_pads_with_50256_and_ignores_every_pad_target_after_the_first():
    x, y = instruction_collate([[1, 2, 3, 4, 5], [6, 7]])
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, 50256, 50256, 50256]]
    assert y.tolist() == [[2, 3, 4, 5, 50256], [7, 50256, -100, -100, -100]]


def test_collate_keeps_real_50256_tokens_inside_a_text():
    # position decides, not the value: an <|endoftext|> written inside an example still counts
    x, y = instruction_collate([[1, 50256, 3], [4]])
    assert y.tolist() == [[50256, 3, 50256], [50256, -100, -100]]


def test_mask_prompt_counts_only_the_response_and_its_end():
    records = [
        {"instruction": "Say hi.", "input": "", "output": "Hi there."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    plain = encode_instructions(ENC, records, 1024, "t")
    masked = encode_instructions(ENC, records, 1024, "t", mask_prompt=True)
    x0, y0 = plain.gather([0, 1])
    x1, y1 = masked.gather([0, 1])
    assert torch.equal(x0, x1)
    for i, r in enumerate(records):
        prompt = encode(ENC, format_instruction(r["instruction"], r["input"]))
        response = encode(ENC, r["output"]) + [50256]
        kept = y1[i][y1[i] != IGNORE_INDEX].tolist()
        assert kept == response
        assert (y0[i] != IGNORE_INDEX).sum() == len(prompt) + len(response) - 1
        # the first counted target is predicted at the last prompt position
        assert y1[i, len(prompt) - 2] == IGNORE_INDEX and y1[i, len(prompt) - 1] == response[0]


def test_long_examples_are_cut_with_a_notice(capsys):
    records = [{"instruction": "word " * 50, "input": "", "output": "x"}]
    data = encode_instructions(ENC, records, 20, "train.json")
    assert len(data.ids[0]) == 20
    assert "1 of 1 examples in train.json are longer than 20 tokens" in capsys.readouterr().err
    ids = encode_texts(ENC, ["a b c d e f g", "a"], 3, "val.csv")
    assert [len(i) for i in ids] == [3, 1]
    assert "--max-length" in capsys.readouterr().err


def write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_tables_csv_and_tsv(tmp_path):
    csv_file = write(tmp_path, "a.csv", 'label,text\nspam,"Win, now!"\nham,see you\n\n')
    assert read_table(csv_file) == (["Win, now!", "see you"], ["spam", "ham"])
    tsv_file = write(tmp_path, "a.tsv", "text\tlabel\nWin, now!\t1\nsee you\t0\n")
    assert read_table(tsv_file) == (["Win, now!", "see you"], ["1", "0"])


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("e.csv", "", "is empty"),
        ("h.csv", "text,label\n", "no examples"),
        ("c.csv", "sentence,label\nhi,1\n", "no 'text' column"),
        ("n.csv", "text,label\nhi,\n", "line 2 has no label"),
        ("t.tsv", "text\tlabel\n\tspam\n", "line 2 has an empty text"),
    ],
)
def test_table_errors(tmp_path, name, text, needle):
    with pytest.raises(Gpt2LoadError, match=needle):
        read_table(write(tmp_path, name, text))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(Gpt2LoadError, match="does not exist"):
        read_table(tmp_path / "nope.csv", "--train")


def test_label_names():
    assert make_label_names(["spam", "ham", "spam"]) == ["ham", "spam"]
    assert make_label_names(["1", "0"]) == ["0", "1"]
    assert make_label_names(["2", "0", "0"]) == ["0", "1", "2"]  # integer labels are their own index
    assert make_label_names(["2", "0"]) == ["0", "2"]  # ... when below the example count: else names
    assert make_label_names(["1", "0"], num_classes=4) == ["0", "1", "2", "3"]
    assert make_label_names(["10", "-1", "2"]) == ["-1", "2", "10"]
    for labels, n, needle in [
        (["a", "b"], 1, "at least 2"),
        (["a", "a"], None, "only the label"),
        (["a", "b", "c"], 2, "too few"),
        (["a", "b"], 3, "without a name"),
    ]:
        with pytest.raises(Gpt2LoadError, match=needle):
            make_label_names(labels, n)
    with pytest.raises(Gpt2LoadError, match="'maybe'"):
        label_indices(["spam", "maybe"], ["ham", "spam"], "--val v.csv")


def test_classification_batches_put_the_label_at_the_pooled_position():
    data = ClassificationData([[5, 6, 7], [8]], [1, 0], width=4)
    x, y = data.gather([0, 1])
    assert x.tolist() == [[5, 6, 7, 50256], [8, 50256, 50256, 50256]]
    assert y.tolist() == [[-100, -100, 1, -100], [0, -100, -100, -100]]
    data.pool = "last"
    _, y = data.gather([0, 1])
    assert y.tolist() == [[-100, -100, -100, 1], [-100, -100, -100, 0]]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('[{"instruction": "a", "output": "b"},', r"not valid JSON \(line 1"),
        ('{"instruction": "a"}', "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('[{"instruction": "a", "input": ""}]', "record 0 has no output"),
        ('[{"output": "a"}]', "record 0 has no instruction"),
        ('[{"instruction": "a", "output": 3}]', "output that is not text"),
        ('["text"]', "record 0 is a string, not an object"),
    ],
)
def test_instruction_file_errors(tmp_path, content, needle):
    with pytest.raises(Gpt2LoadError, match=needle):
        read_instructions(write(tmp_path, "d.json", content))


def test_instruction_records_default_the_input(tmp_path):
    p = write(
        tmp_path,
        "d.json",
        json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]),
    )
    assert read_instructions(p) == [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]
