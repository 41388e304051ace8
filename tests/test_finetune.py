"""The fine-tuning commands end to end on a tiny model: a classifier reaches high accuracy and resumes
exactly, `classify` prints its shape, an instruction model overfits 8 examples and `generate --instruction`
returns them, LoRA lowers the loss, and bad input is one clear line with nothing written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TOKENIZER_DIR, assert_clean_error, run_cli
from safetensors.torch import load_file

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.exports import save_model
from gpt2load.load import load_gpt2, model_metadata
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.model.lora import lora_settings

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
POS = ["good", "great", "lovely", "happy", "sunny", "bright"]
NEG = ["bad", "awful", "sad", "gloomy", "dark", "rainy"]
FILLER = ["the", "day", "was", "very", "and", "so", "it", "felt"]
RECORDS = [
    {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
    {"instruction": "Pick a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Describe an animal.", "input": "", "output": "A horse."},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
    {"instruction": "Spell the number.", "input": "7", "output": "seven"},
    {"instruction": "Which planet is red?", "input": "", "output": "Mars."},
]


def tiny_model(folder: Path, context: int, emb: int, heads: int = 2) -> Path:
    """A random GPT-2-vocabulary model, small embeddings so that tokens and positions weigh alike."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=context, emb_dim=emb, n_heads=heads, n_layers=2))
    with torch.no_grad():
        model.tok_emb.weight.mul_(0.05)
        model.pos_emb.weight.mul_(0.05)
    return save_model(model, folder, tokenizer_dir=TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny", 32, 16)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    """Separable sentiment-like data: two words of the class's vocabulary among neutral filler."""
    rng, folder = random.Random(0), tmp_path_factory.mktemp("tables")
    paths = {}
    for name, n in (("train", 160), ("val", 40), ("test", 40)):
        lines = ["text,label"]
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = [rng.choice(POS if label == "pos" else NEG) for _ in range(2)]
            words += [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
            rng.shuffle(words)
            lines.append(f"{' '.join(words)},{label}")
        paths[name] = folder / f"{name}.csv"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def classify_cmd(model_dir: Path, tables: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "classify", "--model", str(model_dir), "--train", str(tables["train"]), "--val",
        str(tables["val"]), "--test", str(tables["test"]), "--out", str(out), "--train-layers", "all",
        "--lr", "1e-2", "--eval-every", "20", "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_classifier_learns_and_classify_prints_labels_and_probabilities(model_dir, tables, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*classify_cmd(model_dir, tables, out, "--max-steps", "60"))
    assert proc.returncode == 0, proc.stderr
    metrics = rows(out)
    for key in ("step", "epoch", "train_loss", "val_loss", "train_acc", "val_acc"):
        assert metrics[0][key] is not None, key
    assert metrics[-1]["final"] and metrics[-1]["test_acc"] >= 0.95
    final = out / "final"
    assert json.loads(model_metadata(final)["classifier"])["labels"] == ["neg", "pos"]
    assert load_file(final / "model.safetensors")["out_head.weight"].shape == (2, 16)

    texts = ["good lovely day", "so dark and rainy"]
    proc = run_cli(
        "classify", "--model", str(final), "--text", texts[0], "--text", texts[1], "--json", "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [r["label"] for r in result["results"]] == ["pos", "neg"]
    for r in result["results"]:
        assert set(r) == {"label", "probs"} and set(r["probs"]) == {"neg", "pos"}
        assert abs(sum(r["probs"].values()) - 1) < 1e-5 and r["probs"][r["label"]] > 0.5
    proc = run_cli("classify", "--model", str(final), "--text", texts[0], "--device", "cpu")
    assert proc.returncode == 0 and proc.stdout.startswith("pos\t(neg "), proc.stdout


def test_classifier_resumes_exactly_after_kill_9(model_dir, tables, tmp_path):
    flags = ["--max-steps", "30", "--save-every", "5", "--eval-every", "5", "--seed", "3", "--lora-rank", "2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_cli(*classify_cmd(model_dir, tables, whole, *flags))
    assert proc.returncode == 0, proc.stderr
    p = subprocess.Popen(
        [sys.executable, "-m", "gpt2load", *classify_cmd(model_dir, tables, killed, *flags)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ck = killed / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and not list(ck.glob("step-0000[1-9]*.pt")):
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    proc = run_cli(*classify_cmd(model_dir, tables, killed, *flags, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(killed)] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows(whole)
    ]


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny", 96, 32, heads=4)


def test_instruction_model_overfits_and_generate_instruction_answers(instruct_model, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    out = tmp_path / "run"
    proc = run_cli(
        "finetune", "instruct", "--model", str(instruct_model), "--data", str(data), "--out", str(out),
        "--mask-prompt", "--max-steps", "60", "--lr", "1e-2", "--eval-every", "25", "--eval-batches", "1",
        "--device", "cpu", "--quiet", timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    final = out / "final"
    assert model_metadata(final)["prompt_template"] == "alpaca"
    for r in RECORDS[:4]:
        args = ["generate", "--model", str(final), "--instruction", r["instruction"], "--device", "cpu", "--quiet"]
        proc = run_cli(*args, *(["--input", r["input"]] if r["input"] else []), "--max-new-tokens", "8")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == r["output"] + "\n"  # only the response, stopped at <|endoftext|>
    args = ["generate", "--model", str(final), "--instruction", "Spell the number.", "--input", "7", "--json"]
    proc = run_cli(*args, "--device", "cpu", "--max-new-tokens", "8")
    assert json.loads(proc.stdout)["completions"][0]["text"] == "seven"


def test_lora_training_lowers_the_loss(instruct_model, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    out = tmp_path / "run"
    cmd = [
        "finetune", "instruct", "--model", str(instruct_model), "--data", str(data), "--out", str(out),
        "--lora-rank", "4", "--max-steps", "6", "--lr", "1e-2", "--eval-every", "6", "--eval-batches", "1",
        "--device", "cpu", "--quiet",
    ]  # fmt: skip
    proc = run_cli(*cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = rows(out)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.2
    # merged: a plain GPTModel whose frozen parts moved only by the adapters' update
    a, b = load_file(instruct_model / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert torch.equal(a["tok_emb.weight"], b["tok_emb.weight"])  # not a LoRA target: untouched
    assert not torch.equal(a["trf_blocks.0.att.W_query.weight"], b["trf_blocks.0.att.W_query.weight"])

    # --no-merge: the base weights plus adapters.safetensors, which loading puts back on
    kept = tmp_path / "kept"
    proc = run_cli(*cmd[:7], str(kept), *cmd[8:], "--no-merge", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(kept / "final" / "model.safetensors")["trf_blocks.0.att.W_query.weight"],
                       a["trf_blocks.0.att.W_query.weight"])  # fmt: skip
    merged, adapted = load_gpt2(out / "final", device="cpu"), load_gpt2(kept / "final", device="cpu")
    assert lora_settings(adapted)["rank"] == 4 and lora_settings(merged) is None
    x = torch.tensor([[50256, 464, 3797, 318, 257]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), merged(x), atol=1e-5, rtol=0)
    texts = []
    for folder in (out, kept):  # every command reads both, the run folder itself included; greedy text agrees
        gen = ["generate", "--model", str(folder), "--prompt", "Name a fruit.", "--max-new-tokens", "5", "--json"]
        proc = run_cli(*gen, "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        texts.append(json.loads(proc.stdout)["completions"][0]["text"])
    assert texts[0] == texts[1]
    # a resumed, longer run replaces its own earlier output, adapters and all
    proc = run_cli(*cmd[:7], str(kept), *cmd[8:], "--no-merge", "--resume", "--max-steps", "7", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert load_file(kept / "adapters.safetensors").keys() == load_file(kept / "final" / "adapters.safetensors").keys()
    (kept / "final" / "adapters.safetensors").unlink()
    with pytest.raises(Gpt2LoadError, match="adapters.safetensors, which is missing"):
        load_gpt2(kept / "final")


@pytest.mark.parametrize(
    "table, extra, needle",
    [
        ("text,label\n", [], "no examples"),
        ("", [], "is empty"),
        ("sentence,label\ngood day,pos\nbad day,neg\n", [], "no 'text' column"),
        (None, ["--num-classes", "1"], "at least 2 classes"),
        (None, ["--lora-rank", "0"], "--lora-rank must be a positive integer"),
        (None, ["--val", "VAL_UNSEEN"], "'meh'"),
    ],
)
def test_bad_classification_input_is_one_line_and_writes_nothing(model_dir, tables, tmp_path, table, extra, needle):
    train = tables["train"]
    if table is not None:
        train = tmp_path / "bad.csv"
        train.write_text(table, encoding="utf-8")
    if "VAL_UNSEEN" in extra:
        val = tmp_path / "val.csv"
        val.write_text("text,label\ngood day,pos\nso so,meh\n", encoding="utf-8")
        extra = ["--val", str(val)]
    out = tmp_path / "out"
    cmd = classify_cmd(model_dir, {**tables, "train": train}, out, "--max-steps", "2", *extra)
    assert_clean_error(run_cli(*cmd), needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "content, needle",
    [('[{"instruction": "a"', "not valid JSON"), ('[{"instruction": "a", "input": "b"}]', "no output")],
)
def test_bad_instruction_data_is_one_line_and_writes_nothing(instruct_model, tmp_path, content, needle):
    data = tmp_path / "data.json"
    data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    proc = run_cli(
        "finetune",
        "instruct",
        "--model",
        str(instruct_model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert_clean_error(proc, needle, str(data))
    assert not out.exists()


def test_train_with_lora_rank_4_lowers_the_loss(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat. The dog sat on the log.\n" * 60, encoding="utf-8")
    out = tmp_path / "run"
    proc = run_cli(
        "train", "--model", str(model_dir), "--data", str(corpus), "--out", str(out), "--lora-rank", "4",
        "--lora-alpha", "2", "--max-steps", "8", "--context-length", "16", "--lr", "1e-2", "--eval-every", "8",
        "--eval-batches", "2", "--batch-size", "4", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = rows(out)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.2
    a, b = load_file(model_dir / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # merged: only the adapted Linears' weights moved
        adapted = name.endswith(".weight") and any(t in name for t in ("W_query", "W_key", "W_value", "out_proj", "ff"))
        assert torch.equal(a[name], b[name]) != adapted, name
