"""Recognising what the user named (a model name or a path), old-format torch files, the conversion cache,
and building without touching other threads."""

import json
import threading
from pathlib import Path

import pytest
import torch
from helpers import add_tokenizer, copy_fixture, run_cli
from oracle import TINY, pair

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.cache import cache_dir, cache_file
from gpt2load.formats.layouts import open_source
from gpt2load.formats.ownform import CACHE_NAME
from gpt2load.info import info
from gpt2load.load import load_gpt2, locate
from gpt2load.model.build import _SkipInit
from gpt2load.model.config import GPTConfig

X = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(X)


@pytest.fixture
def book_workdir(tmp_path, monkeypatch):
    """The book's working folder: `gpt2/124M/` holds the TF download, so `gpt2/` itself is not a model."""
    d = copy_fixture("openai-tiny", tmp_path)
    (tmp_path / "gpt2").mkdir()
    d.rename(tmp_path / "gpt2" / "124M")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_name_wins_over_a_same_named_folder_that_is_not_a_model(book_workdir):
    assert locate("gpt2") == (None, "124M")
    assert locate("124M") == (None, "124M")


@pytest.mark.parametrize("written", ["./gpt2", "gpt2/124M", "gpt2/", "~/nowhere"])
def test_a_path_is_a_path_when_written_as_one(book_workdir, written):
    path, size = locate(written)
    assert size is None and path is not None and str(path).endswith(written.strip("./~").rstrip("/"))


def test_an_absolute_path_and_a_path_object_are_paths(book_workdir):
    assert locate(str(book_workdir / "gpt2" / "124M")) == (book_workdir / "gpt2" / "124M", None)
    assert locate(book_workdir / "gpt2") == (book_workdir / "gpt2", None)


def test_a_same_named_folder_that_holds_a_model_is_used(book_workdir):
    (book_workdir / "gpt2" / "124M").rename(book_workdir / "gpt2-medium")
    assert locate("gpt2-medium") == (Path("gpt2-medium"), None)


def test_an_unknown_bare_word_says_it_is_neither(book_workdir):
    with pytest.raises(Gpt2LoadError, match=r"unknown model 'gtp2'.*no file or folder 'gtp2' here either"):
        locate("gtp2")


def test_info_of_a_name_in_the_books_working_folder(book_workdir, monkeypatch):
    monkeypatch.setenv("GPT2LOAD_WEIGHTS_DIR", str(book_workdir / "w"))
    got = info("gpt2")
    assert got["model"] == "124M" and "not downloaded" in got["path"]
    local = info("gpt2/124M")
    assert local["layout"] == "openai" and local["n_layers"] == 2


def test_info_reports_model_and_tokenizer_vocabularies(tmp_path):
    d = add_tokenizer(copy_fixture("openai-tiny", tmp_path))
    hp = json.loads((d / "hparams.json").read_text())
    got = info(str(d))
    assert got["vocab_size"] == hp["n_vocab"] == 96 and got["tokenizer_vocab_size"] == 50257
    assert "outside the model" in got["vocab_note"]


@pytest.mark.parametrize("where", ["book.pth", "hf/pytorch_model.bin"])
def test_old_format_torch_files_load(tmp_path, where):
    """torch.save's legacy (pre-1.6, non-zip) format cannot be memory-mapped; it is read into memory instead."""
    cfg = GPTConfig(vocab_size=96, context_length=64, emb_dim=768, n_heads=12, n_layers=1)
    hf, model = pair(cfg if where == "book.pth" else TINY)
    path = tmp_path / where
    path.parent.mkdir(exist_ok=True)
    if where == "book.pth":
        state = {k: v for k, v in model.state_dict().items()}
    else:
        hf.config.save_pretrained(path.parent)
        state = hf.state_dict()
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="mmap"):  # the reason a fallback is needed
        torch.load(path, weights_only=True, mmap=True)
    got = load_gpt2(path if where == "book.pth" else path.parent, device="cpu")
    assert torch.equal(logits(got), logits(model))


def _cached(tmp_path):
    return sorted(p.relative_to(tmp_path) for p in tmp_path.rglob(CACHE_NAME))


def test_the_cache_lives_in_its_own_folder_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LOAD_CACHE_DIR", str(tmp_path / "cache"))
    d = copy_fixture("openai-tiny", tmp_path)
    listing = sorted(p.name for p in d.iterdir())
    load_gpt2(d, device="cpu", cache=False)
    monkeypatch.setenv("GPT2LOAD_NO_CACHE", "1")
    load_gpt2(d, device="cpu")
    assert _cached(tmp_path) == []
    monkeypatch.setenv("GPT2LOAD_NO_CACHE", "0")
    load_gpt2(d, device="cpu")
    entry = cache_file(open_source(d))
    assert _cached(tmp_path) == [entry.relative_to(tmp_path)] and entry.parent.parent == tmp_path / "cache"
    assert sorted(p.name for p in d.iterdir()) == listing  # nothing written beside the source


def test_cache_dir_defaults_to_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2LOAD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gpt2load" / "converted"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "gpt2load" / "converted"


def test_no_cache_flag(tmp_path):
    d = add_tokenizer(copy_fixture("openai-tiny", tmp_path))
    env = {"GPT2LOAD_CACHE_DIR": str(tmp_path / "cache")}
    args = ("generate", "--model", str(d), "--prompt", "A", "--max-new-tokens", "2", "--device", "cpu", "--json")
    proc = run_cli(*args, "--no-cache", env=env)
    assert proc.returncode == 0, proc.stderr
    assert _cached(tmp_path) == []
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(_cached(tmp_path)) == 1


def test_skipping_init_is_confined_to_the_building_thread():
    """Building on the meta device skips torch.nn.init, but only on the thread doing it."""
    filled = {}

    def other_thread():
        t = torch.empty(3)
        torch.nn.init.constant_(t, 7.0)
        filled["other"] = t

    mine = torch.zeros(3)
    with _SkipInit():
        torch.nn.init.constant_(mine, 7.0)  # skipped here
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert torch.equal(mine, torch.zeros(3))
    assert torch.equal(filled["other"], torch.full((3,), 7.0))
    assert torch.nn.Linear.reset_parameters.__qualname__ == "Linear.reset_parameters"  # nothing patched
