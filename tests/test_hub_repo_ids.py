"""Any Hugging Face repo id `owner/name` downloads as the four sizes do (verified, resumable, --revision), when its
config.json says model_type gpt2; another kind of model is one line saying what it is. Against hubserver."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TOKENIZER_DIR, assert_clean_error, run_cli
from hubserver import Fault, Hub
from oracle import TINY, hf_model

from gpt2load import load_gpt2
from gpt2load.errors import Gpt2LoadError
from gpt2load.hub.fetch import download, model_dir
from gpt2load.hub.manifest import MANIFEST
from gpt2load.hub.sources import is_repo_id
from gpt2load.info import info
from gpt2load.load import locate

REPO = "someone/tiny-gpt2"


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory):
    """(the files of a tiny gpt2 repo, the transformers model they hold)."""
    folder = tmp_path_factory.mktemp("repo")
    model = hf_model(TINY)
    model.save_pretrained(folder, safe_serialization=True)
    files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
    files["vocab.json"] = (TOKENIZER_DIR / "encoder.json").read_bytes()
    files["merges.txt"] = (TOKENIZER_DIR / "vocab.bpe").read_bytes()
    return files, model


@pytest.fixture
def hub(repo_files, tmp_path, monkeypatch):
    for var in ("GPT2LOAD_WEIGHTS_DIR", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("GPT2LOAD_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("GPT2LOAD_MAX_RETRIES", "3")
    monkeypatch.chdir(tmp_path)
    with Hub() as h:
        h.add_hf(REPO, repo_files[0])
        bert = {**repo_files[0], "config.json": json.dumps({"model_type": "bert", "hidden_size": 32}).encode()}
        h.add_hf("someone/tiny-bert", bert)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def test_repo_id_downloads_verified_and_loads_as_transformers_computes(hub, repo_files, tmp_path):
    _, reference = repo_files
    # cut once mid-file: the download resumes with a Range request
    hub.faults[f"{REPO}/model.safetensors"] = Fault(cut_after=1000)
    net = load_gpt2(REPO, weights_dir=tmp_path / "w", device="cpu", quiet=True)
    folder = tmp_path / "w" / "hf" / "someone--tiny-gpt2"
    assert model_dir(REPO, weights_dir=tmp_path / "w") == folder
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "model.safetensors" in json.dumps(manifest)
    assert any(r.headers.get("Range") for r in hub.requests_for(f"{REPO}/model.safetensors"))
    x = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x).logits, atol=1e-5, rtol=1e-4)
    assert info(REPO, weights_dir=tmp_path / "w")["n_layers"] == TINY.n_layers


def test_revision_and_cli(hub, tmp_path):
    hub.revisions["v1.0"] = "ab" * 20
    proc = run_cli("download", REPO, "--revision", "v1.0", "--quiet", "--weights-dir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("someone--tiny-gpt2@v1.0")
    assert any("/resolve/v1.0/" in r.path for r in hub.requests)
    gen = run_cli("info", REPO, "--weights-dir", str(tmp_path / "w"))
    assert_clean_error(gen, "someone/tiny-gpt2 is not downloaded", "gpt2load download someone/tiny-gpt2")


def test_a_repo_of_another_kind_is_one_line(hub, tmp_path):
    proc = run_cli("download", "someone/tiny-bert", "--quiet", "--weights-dir", str(tmp_path / "w"))
    assert_clean_error(proc, "someone/tiny-bert is a 'bert' model", "not GPT-2")
    assert not hub.requests_for("someone/tiny-bert/model.safetensors")  # refused before the weights
    assert not list((tmp_path / "w" / "hf" / "someone--tiny-bert").glob("config.json*"))
    with pytest.raises(Gpt2LoadError, match="drop --source openai"):
        download(REPO, "openai", tmp_path / "w")


def test_sizes_aliases_and_local_folders_keep_working(hub, tmp_path):
    assert locate("openai-community/gpt2") == (None, "124M")
    assert locate("gpt2-xl") == (None, "1558M")
    assert locate(REPO) == (None, REPO)
    assert model_dir("openai-community/gpt2-medium", weights_dir=tmp_path).name == "355M"
    local = tmp_path / "someone" / "tiny-gpt2"
    local.mkdir(parents=True)
    assert locate(REPO) == (None, REPO)  # an empty folder of that name is not a model
    (local / "model.pth").write_bytes(b"")
    (local / "config.json").write_text("{}")
    assert locate(REPO) == (local.relative_to(tmp_path), None)  # a folder holding a model wins
    for written in ("./someone/tiny-gpt2", "someone/model.pth", "a/b/c", "someone--x/y", "a/b.", "/abs/x"):
        assert locate(written)[1] is None, written
    assert is_repo_id("gpt2/124M") and not is_repo_id("a/../b") and not is_repo_id("a/b/c")
