"""--n-heads / n_heads=: a book-layout .pth (a bare state_dict) of a width no GPT-2 size has loads with it
on every command that loads a model, and fails with the one-line hint without it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import add_tokenizer, assert_clean_error, run_cli

from gpt2load import load_gpt2
from gpt2load.cli.main import build_parser
from gpt2load.info import info
from gpt2load.load import model_metadata
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.tensors import iter_tensors, tensor_table

CFG = GPTConfig(vocab_size=50257, context_length=16, emb_dim=48, n_heads=3, n_layers=2)  # 48: no GPT-2 width


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """(path of the book's torch.save(model.state_dict()), the model)."""
    folder = add_tokenizer(tmp_path_factory.mktemp("book"))
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    path = folder / "model.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_api_loads_with_n_heads_and_matches(book):
    path, model = book
    net = load_gpt2(path, device="cpu", n_heads=3)
    assert net.cfg.n_heads == 3
    x = torch.randint(0, CFG.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))
    assert info(str(path), n_heads=3)["n_heads"] == 3
    names = set(model.state_dict()) - {"out_head.weight"}  # tied to tok_emb, so stored once
    assert set(dict(iter_tensors(path, n_heads=3))) == names
    assert {r["name"] for r in tensor_table(path, n_heads=3)} == names
    assert model_metadata(path, n_heads=3) == {}


def test_api_without_n_heads_names_the_fix(book):
    path, _ = book
    for call in (lambda: load_gpt2(path, device="cpu"), lambda: info(str(path)), lambda: model_metadata(path)):
        with pytest.raises(Exception, match="--n-heads N"):
            call()


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu", "--json", "--quiet"],
        ["info"],
        ["info", "--tensors"],
        ["convert", "--to", "safetensors", "--quiet"],
    ],
)
def test_cli_n_heads(book, tmp_path, command):
    path, _ = book
    args = [*command, "--model", str(path)] if command[0] != "info" else [command[0], str(path), *command[1:]]
    if command[0] == "convert":
        args += ["--out", str(tmp_path / "out.safetensors")]
    bad = run_cli(*args)
    assert_clean_error(bad, "emb_dim 48 is not a GPT-2 size", "--n-heads N")
    good = run_cli(*args, "--n-heads", "3")
    assert good.returncode == 0, good.stderr
    if command[0] == "generate":
        assert len(json.loads(good.stdout)["completions"]) == 1
    if command == ["info"]:
        assert "n_heads:" in good.stdout and "3" in good.stdout.split("n_heads:")[1].splitlines()[0]
    if command[0] == "convert":  # gpt2load's own form records the config: no flag needed any more
        assert load_gpt2(tmp_path / "out.safetensors", device="cpu").cfg.n_heads == 3


def test_every_loading_command_takes_n_heads(tmp_path):
    parser = build_parser()
    commands = [
        ["generate", "--prompt", "x"],
        ["convert", "--to", "pth", "--out", "o.pth"],
        ["info", "m"],
        ["serve"],
        ["train", "--data", "d", "--out", "o"],
        ["finetune", "classify", "--train", "t", "--val", "v", "--out", "o"],
        ["finetune", "instruct", "--data", "d", "--out", "o"],
        ["classify", "--model", "m", "--text", "t"],
    ]
    for argv in commands:
        assert parser.parse_args([*argv, "--n-heads", "3"]).n_heads == 3, argv
        assert parser.parse_args(argv).n_heads is None, argv
    assert not hasattr(parser.parse_args(["download", "124M"]), "n_heads")
    proc = run_cli("info", "m", "--n-heads", "0")
    assert proc.returncode == 1 and "out of range" in proc.stderr


def test_train_and_finetune_pass_n_heads(book, tmp_path):
    from gpt2load.finetune.recipes import FinetuneConfig
    from gpt2load.training.pretrain import train_on_files

    path, _ = book
    text = tmp_path / "a.txt"
    text.write_text("hello world, " * 40)
    with pytest.raises(Exception, match="--n-heads N"):
        train_on_files(path, [text], tmp_path / "run0", max_steps=1, quiet=True, progress=False, device="cpu")
    out = train_on_files(
        path,
        [text],
        tmp_path / "run",
        max_steps=1,
        batch_size=2,
        val_ratio=0,
        quiet=True,
        progress=False,
        device="cpu",
        n_heads=3,
    )
    assert load_gpt2(out, device="cpu").cfg.n_heads == 3
    assert FinetuneConfig(n_heads=3).n_heads == 3
