"""The fine-tuning readers under hostile input: rows end only where the csv module says, labels cannot ask for
absurd class counts or crash on long digits, JSON nesting and field types give one clear error, and the CLI
turns each into one line and exit 1."""

from __future__ import annotations

import csv
import json
import time

import pytest
from helpers import assert_clean_error, run_cli

from gpt2load.errors import Gpt2LoadError
from gpt2load.finetune.data import MAX_CLASSES, label_indices, make_label_names, read_instructions, read_table

# characters str.splitlines breaks at that csv.writer leaves unquoted
BREAKERS = ["\x85", "\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"]


def written(tmp_path, name: str, rows: list[list[str]], delimiter: str = ",") -> tuple:
    path = tmp_path / name
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows([["text", "label"], *rows])
    return path


@pytest.mark.parametrize("name, delimiter", [("d.csv", ","), ("d.tsv", "\t")])
def test_line_breaking_characters_csv_writer_leaves_unquoted_stay_inside_their_text(tmp_path, name, delimiter):
    # odd rows hold the delimiter (so csv.writer quotes them), even rows do not (left unquoted)
    rows = [[f"row {i}{BREAKERS[i % 8]}injected" + (f"{delimiter}1 x" if i % 2 else ""), str(i % 2)] for i in range(32)]
    path = written(tmp_path, name, rows, delimiter)
    assert f"\nrow 0{BREAKERS[0]}injected{delimiter}0" in path.read_text(encoding="utf-8")  # really unquoted
    texts, labels = read_table(path)
    assert texts == [r[0] for r in rows] and labels == [r[1] for r in rows]


def test_an_unquoted_form_feed_is_part_of_the_text(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes("text,label\nhi\x0cthere,1\nbye\x85now,0\r\nlast\x0bone,1".encode())
    assert read_table(path) == (["hi\x0cthere", "bye\x85now", "last\x0bone"], ["1", "0", "1"])


def test_huge_integer_labels_name_classes_instead_of_allocating_them():
    start = time.perf_counter()
    names = make_label_names(["0", "1", "100000000000", "1"])
    assert names == ["0", "1", "100000000000"]
    assert time.perf_counter() - start < 1  # a list of 10^11 names would not end
    assert label_indices(["100000000000", "0"], names, "v") == [2, 0]


def test_integer_labels_are_indices_only_below_the_example_count():
    assert make_label_names(["3", "0", "0", "0"]) == ["0", "1", "2", "3"]
    assert make_label_names(["4", "0", "0", "0"]) == ["0", "4"]
    assert make_label_names(["4", "0"], num_classes=5) == ["0", "1", "2", "3", "4"]


def test_labels_of_thousands_of_digits_sort_numerically_without_int():
    long_pos, long_neg = "7" * 5001, "-" + "9" * 5001
    names = make_label_names([long_pos, "2", long_neg, "2"])
    assert names == [long_neg, "2", long_pos]
    assert label_indices([long_pos], names, "v") == [2]
    with pytest.raises(Gpt2LoadError, match=r"has labels the training data does not: '8888") as e:
        label_indices(["8" * 5001], names, "v")
    assert len(str(e.value)) < 400  # the label is cut in the message


def test_class_counts_are_bounded():
    with pytest.raises(Gpt2LoadError, match=f"at most {MAX_CLASSES}"):
        make_label_names(["a", "b"], num_classes=100_000_000_000)
    with pytest.raises(Gpt2LoadError, match=f"has {MAX_CLASSES + 1} different labels, more than the {MAX_CLASSES}"):
        make_label_names([f"w{i}" for i in range(MAX_CLASSES + 1)])


def test_integer_labels_written_two_ways():
    # "0" and "01" are two labels as written: two classes, and the file is consistent with itself
    names = make_label_names(["0", "01", "0"])
    assert names == ["0", "01"] and label_indices(["0", "01"], names, "t") == [0, 1]
    with pytest.raises(Gpt2LoadError, match="writes one label both as '01' and as '1'"):
        make_label_names(["0", "01", "1"])
    with pytest.raises(Gpt2LoadError, match="writes the label '01' as '1': labels are compared as written") as e:
        label_indices(["1"], names, "--val v.csv")
    assert "does not" not in str(e.value)


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[" * 100_000 + "]" * 100_000, "nests lists or objects too deeply"),
        ('[{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "b"}]', "too deeply"),
        ('[{"instruction": "a", "output": 1' + "1" * 5000 + "}]", "holds a number JSON cannot read"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": null, "output": "b"}]', "record 1 has an instruction"),
        (
            '[{"instruction": "a", "input": null, "output": "b"}]',
            'input that is not text but null: write a string, or ""',
        ),
        ('[{"instruction": "a", "output": null}]', "record 0 has an output that is not text but null"),
        ('[{"instruction": ["a"], "output": "b"}]', "not text but a list"),
        ('[{"instruction": "a", "input": {}, "output": "b"}]', "not text but an object"),
        ('[{"instruction": "a", "output": true}]', "not text but true/false"),
        ("[3]", "record 0 is a number, not an object"),
    ],
)
def test_instruction_json_errors_name_the_record(tmp_path, content, needle):
    path = tmp_path / "d.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(Gpt2LoadError, match=needle.replace("(", r"\(")) as e:
        read_instructions(path)
    assert "\n" not in str(e.value)


def test_absent_and_empty_inputs_are_empty(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "", "output": ""}]))
    assert [r["input"] for r in read_instructions(path)] == ["", ""]


def test_the_cli_gives_one_line_and_exit_1(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    nulls = tmp_path / "nulls.json"
    nulls.write_text('[{"instruction": null, "output": "b"}]')
    model = str(tmp_path / "no-model")  # never reached: the data is read first
    for data, needle in ((deep, "too deeply"), (nulls, "record 0 has an instruction that is not text but null")):
        proc = run_cli("finetune", "instruct", "--model", model, "--data", str(data), "--out", str(tmp_path / "o"))
        assert proc.returncode == 1
        assert_clean_error(proc, needle, str(data))
    train = written(tmp_path, "train.csv", [["good", "01"], ["bad", "0"], ["fine", "01"]])
    val = written(tmp_path, "val.csv", [["nice", "1"], ["awful", "0"]])
    cmd = ["finetune", "classify", "--model", model, "--train", str(train), "--val", str(val)]
    proc = run_cli(*cmd, "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert_clean_error(proc, "writes the label '01' as '1'", str(val))
    assert not (tmp_path / "o").exists()
