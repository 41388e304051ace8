"""Hostile and careless output paths (issue 9, items 1-4), through the CLI as a user runs it: every refusal is
one line, exit 1, no traceback, and every file the user had is still there, byte for byte."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TOKENIZER_DIR, assert_clean_error, run_cli

from gpt2load.formats.exports import save_model
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel

CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2)
TRAIN = ["--context-length", "16", "--batch-size", "2", "--eval-batches", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(GPTModel(CFG), tmp_path_factory.mktemp("m") / "tiny", tokenizer_dir=TOKENIZER_DIR)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("The cat sees the ball. A dog likes the river.\n" * 60, encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under `root`: kind and content (bytes, link target, device numbers), to compare after."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = ("file", p.read_bytes())
            elif stat.S_ISDIR(st.st_mode):
                out[str(p.relative_to(root))] = ("dir",)
            else:
                out[str(p.relative_to(root))] = ("special", stat.S_IFMT(st.st_mode), st.st_rdev)
    return out


# Each case: (id, setup(work dir, model dir) -> the --out argument, command, needle in the error line).
def _docs(w: Path, m: Path) -> str:
    (w / "docs" / "sub").mkdir(parents=True)
    (w / "docs" / "thesis.txt").write_text("draft\n")
    (w / "docs" / "sub" / "notes.txt").write_text("notes\n")
    return "docs"


def _cwd(w: Path, m: Path) -> str:
    (w / "mine.txt").write_text("my work\n")
    return "."


def _cwd_abs(w: Path, m: Path) -> str:
    (w / "mine.txt").write_text("my work\n")
    return str(w)


def _source(w: Path, m: Path) -> str:
    return str(m)


def _source_parent(w: Path, m: Path) -> str:
    return str(m.parent)


def _fifo(w: Path, m: Path) -> str:
    os.mkfifo(w / "pipe")
    return "pipe"


def _device(w: Path, m: Path) -> str:
    try:
        os.mknod(w / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of the test's own
    except PermissionError:
        pytest.skip("creating a device node needs root (the FIFO and /dev/null cases cover the rest)")
    return "null"


def _dev_null(w: Path, m: Path) -> str:
    if os.geteuid() == 0:  # as root, a wrong answer would replace the system's /dev/null: use the test's own
        return _device(w, m)
    return "/dev/null"


def _symlink_file(w: Path, m: Path) -> str:
    (w / "mine.pth").write_bytes(b"my own weights")
    (w / "link.pth").symlink_to("mine.pth")
    return "link.pth"


def _symlink_dir(w: Path, m: Path) -> str:
    _docs(w, m)
    (w / "link").symlink_to("docs")
    return "link"


def _user_file(w: Path, m: Path) -> str:
    (w / "model.pth").write_bytes(b"my own weights")
    return "model.pth"


def _user_safetensors(w: Path, m: Path) -> str:
    shutil.copyfile(m / "model.safetensors", w / "mine.safetensors")  # gpt2load's format, not its output here
    return "mine.safetensors"


def _changed_output(w: Path, m: Path) -> str:
    """An earlier gpt2load hf output that the user then added a file to: no longer only gpt2load's."""
    assert run_cli("convert", "--model", str(m), "--to", "hf", "--out", str(w / "hf"), "--quiet").returncode == 0
    (w / "hf" / "README.md").write_text("my model card\n")
    return "hf"


Setup = Callable[[Path, Path], str]
CONVERT = [
    ("non-empty folder, hf", _docs, "hf", [], "did not write"),
    ("non-empty folder, safetensors, --force", _docs, "safetensors", ["--force"], "did not write"),
    ("working directory", _cwd, "hf", [], "working directory"),
    ("working directory by absolute path", _cwd_abs, "safetensors", [], "working directory"),
    ("the source itself", _source, "safetensors", [], "model being read"),
    ("an ancestor of the source", _source_parent, "hf", ["--force"], "model being read"),
    ("a FIFO", _fifo, "pth", [], "FIFO"),
    ("a device node", _device, "pth", ["--force"], "device"),
    ("/dev/null", _dev_null, "pth", [], "device"),
    ("a symlink to a file", _symlink_file, "pth", [], "symbolic link"),
    ("a symlink to a folder", _symlink_dir, "hf", ["--force"], "symbolic link"),
    ("a file gpt2load did not write", _user_file, "pth", [], "did not write"),
    ("a gpt2load-format file it did not write", _user_safetensors, "safetensors", ["--force"], "did not write"),
    ("its own output, changed since", _changed_output, "hf", ["--force"], "did not write"),
]
TRAIN_OUT = [
    ("non-empty folder", _docs, "folder that is not a gpt2load training run"),
    ("working directory", _cwd, "working directory"),
    ("a FIFO", _fifo, "not a folder"),
    ("a symlink to a folder", _symlink_dir, "symbolic link"),
]


@pytest.mark.parametrize("setup, to, extra, needle", [c[1:] for c in CONVERT], ids=[c[0] for c in CONVERT])
def test_convert_refuses_what_it_does_not_own(tiny, tmp_path, setup, to, extra, needle):
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny, model)
    work = tmp_path / "work"
    work.mkdir()
    out = setup(work, model)
    before = snapshot(tmp_path)
    proc = run_cli("convert", "--model", str(model), "--to", to, "--out", out, *extra, "--quiet", cwd=work)
    assert_clean_error(proc, needle)
    assert proc.returncode == 1
    assert snapshot(tmp_path) == before  # nothing deleted, replaced or added


@pytest.mark.parametrize("setup, needle", [c[1:] for c in TRAIN_OUT], ids=[c[0] for c in TRAIN_OUT])
def test_train_refuses_an_out_it_does_not_own(tiny, corpus, tmp_path, setup, needle):
    work = tmp_path / "work"
    work.mkdir()
    out = setup(work, tiny)
    before = snapshot(tmp_path)
    args = ["train", "--model", str(tiny), "--data", str(corpus), "--out", out, "--max-steps", "1", *TRAIN]
    proc = run_cli(*args, cwd=work)
    assert_clean_error(proc, needle)
    assert proc.returncode == 1
    assert snapshot(tmp_path) == before


def test_force_replaces_only_its_own_earlier_output(tiny, tmp_path):
    for to, out in (("hf", tmp_path / "hf"), ("safetensors", tmp_path / "own"), ("pth", tmp_path / "m.pth")):
        assert run_cli("convert", "--model", str(tiny), "--to", to, "--out", str(out), "--quiet").returncode == 0
        again = run_cli("convert", "--model", str(tiny), "--to", to, "--out", str(out), "--quiet")
        assert_clean_error(again, "--force")
        beside = tmp_path / "user-notes.txt"
        beside.write_text("mine\n")
        forced = run_cli("convert", "--model", str(tiny), "--to", to, "--out", str(out), "--quiet", "--force")
        assert forced.returncode == 0, forced.stderr
        assert beside.read_text() == "mine\n"
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]
    other = run_cli("convert", "--model", str(tiny), "--to", "hf", "--out", str(tmp_path / "own"), "--force")
    assert_clean_error(other, "safetensors output, not hf")


def test_resume_without_sha256_sidecars_keeps_every_checkpoint_and_the_metrics(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny), "--data", str(corpus), "--out", str(out), *TRAIN]
    args += ["--max-steps", "4", "--save-every", "2", "--eval-every", "2"]
    assert run_cli(*args).returncode == 0
    for side in (out / "checkpoints").glob("*.sha256"):
        side.unlink()  # e.g. copied with `cp *.pt`
    checkpoints = snapshot(out / "checkpoints")
    rows = (out / "metrics.jsonl").read_bytes()
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "unverified" in proc.stderr and "step-000004.pt" in proc.stdout
    assert snapshot(out / "checkpoints") == checkpoints  # none renamed *.corrupt, none rewritten
    assert (out / "metrics.jsonl").read_bytes() == rows


def test_a_second_run_into_the_same_out_fails_while_the_first_runs(tiny, corpus, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny), "--data", str(corpus), "--out", str(out), *TRAIN, "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "gpt2load", *args, "--max-steps", "100000", "--eval-every", "0", "--save-every", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("step-*.pt")) and time.monotonic() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        second = run_cli(*args, "--max-steps", "4")
        assert first.poll() is None, "the first run must still be running"
        assert_clean_error(second, "in use by another gpt2load process")
        assert second.returncode == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the lock with the killed process: the folder is usable again at once
    third = run_cli(*args, "--max-steps", "4", "--save-every", "2")
    assert third.returncode == 0, third.stderr
