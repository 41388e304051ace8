"""Any Hugging Face repo id `owner/name` downloads as the four sizes do (verified, resumable, --revision), when its
config.json says model_type gpt2; another kind of model is one line saying what it is. Against hubserver."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import TOKENIZER_DIR, assert_clean_error, run_cli
from hubserver import Fault, Hub, git_blob_sha1
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
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what save_pretrained wrote before safetensors
    return files, model, (folder / "pytorch_model.bin").read_bytes()


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
        # an older repo: pytorch_model.bin (torch.save of the state_dict) and no model.safetensors
        bin_only = {k: v for k, v in repo_files[0].items() if k != "model.safetensors"}
        h.add_hf("someone/bin-only", {**bin_only, "pytorch_model.bin": repo_files[2]})
        h.add_hf("someone/no-weights", bin_only)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def test_repo_id_downloads_verified_and_loads_as_transformers_computes(hub, repo_files, tmp_path):
    reference = repo_files[1]
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


def test_a_repo_with_only_pytorch_model_bin_downloads_it_verified(hub, repo_files, tmp_path):
    reference = repo_files[1]
    hub.faults["someone/bin-only/pytorch_model.bin"] = Fault(cut_after=1000)  # resumes like the safetensors
    net = load_gpt2("someone/bin-only", weights_dir=tmp_path / "w", device="cpu", quiet=True)
    folder = tmp_path / "w" / "hf" / "someone--bin-only"
    entry = json.loads((folder / MANIFEST).read_text())["files"]["pytorch_model.bin"]
    assert "hub sha256" in entry["verified_by"] and "bin_is_a_state_dict" in entry["verified_by"]
    assert any(r.headers.get("Range") for r in hub.requests_for("someone/bin-only/pytorch_model.bin"))
    assert not (folder / "model.safetensors").exists()
    x = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x).logits, atol=1e-5, rtol=1e-4)
    # a second run is complete: no request for either weights file
    before = len(hub.requests)
    download("someone/bin-only", weights_dir=tmp_path / "w", quiet=True)
    assert len(hub.requests) == before
    # the four sizes never fall back: their model.safetensors is the pinned file
    hub.add_hf(
        "openai-community/gpt2",
        {
            k: hub.files[f"someone/bin-only/{k}"]
            for k in ("config.json", "vocab.json", "merges.txt", "pytorch_model.bin")
        },
    )
    with pytest.raises(Gpt2LoadError, match=r"model.safetensors not found \(HTTP 404\)"):
        download("124M", weights_dir=tmp_path / "w", quiet=True)


def test_a_bin_that_is_not_a_state_dict_is_refused(hub, tmp_path):
    evil = b"not a pickle at all" * 10
    plain = {k: hub.files[f"{REPO}/{k}"] for k in ("config.json", "vocab.json", "merges.txt")}
    hub.add_hf("someone/bad-bin", {**plain, "pytorch_model.bin": evil})
    with pytest.raises(Gpt2LoadError, match="pytorch_model.bin downloaded from .* is corrupt .*weights_only=True"):
        download("someone/bad-bin", weights_dir=tmp_path / "w", quiet=True)
    assert not list((tmp_path / "w" / "hf" / "someone--bad-bin").glob("pytorch_model.bin*"))


def test_a_repo_with_neither_weights_file_is_one_line(hub, tmp_path):
    proc = run_cli("download", "someone/no-weights", "--weights-dir", str(tmp_path / "w"))
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_clean_error(proc, "someone/no-weights (revision main) has neither model.safetensors nor pytorch_model.bin")


def test_offline_a_cached_bin_only_repo_is_used(hub, repo_files, tmp_path, monkeypatch):
    repo = tmp_path / "hf-cache" / "models--someone--bin-only"
    commit = "3" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "vocab.json", "merges.txt", "pytorch_model.bin"):
        data = hub.files[f"someone/bin-only/{name}"]
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".bin") else git_blob_sha1(data)
        (repo / "blobs").mkdir(exist_ok=True)
        (repo / "blobs" / etag).write_bytes(data)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", etag))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = load_gpt2("someone/bin-only", weights_dir=tmp_path / "w", device="cpu", quiet=True)
    assert not hub.requests
    x = torch.randint(0, TINY.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(net(x), repo_files[1](x).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(Gpt2LoadError, match="HF_HUB_OFFLINE is set but .* lacks config.json"):
        download("someone/no-weights", weights_dir=tmp_path / "w", quiet=True)
