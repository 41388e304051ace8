"""The C kernels' cache under damage: a library cut short or unrecorded is rebuilt (a fresh process loading it
would die with SIGBUS), one without the kernels is replaced or left for torch's with one notice, CC is split
like a shell word list, a relative XDG_CACHE_HOME is ignored, and a symlinked temporary folder is refused
without touching what it points at."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2load.fast import native, native_build
from gpt2load.settings import Settings

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="needs gcc to build the kernels")

# a fresh process: the kernel's answer against a float64 product, or why it is unavailable
PROBE = """
import torch
from gpt2load.fast import native
if native.available():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, generator=g), torch.randn(7, 40, generator=g), torch.randn(7, generator=g)
    want = x.double() @ w.double().T + b.double()
    print("right" if torch.allclose(native.gemv(x, w, b).double(), want, atol=1e-4) else "wrong")
else:
    print("unavailable:", native.why_unavailable())
"""


def probe(root: Path, cc: str = "gcc -O2") -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache"), "TMPDIR": str(root / "tmp"), "CC": cc}
    env.pop("GPT2LOAD_NATIVE", None)
    env["OMP_NUM_THREADS"] = "1"
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)


def library(root: Path) -> Path:
    (lib,) = (root / "cache" / "gpt2load" / "native").glob("kernels-*.so")
    return lib


def recorded(lib: Path) -> bool:
    return lib.with_name(lib.name + ".sha256").read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache folder holding a library built by a fresh process with CC="gcc -O2"."""
    if GCC is None:
        pytest.skip("needs gcc to build the kernels")
    root = tmp_path_factory.mktemp("built")
    proc = probe(root)
    assert proc.stdout.strip() == "right" and not proc.stderr, proc.stderr
    return root


@needs_gcc
def test_cc_with_flags_is_split_like_a_shell_word_list(built):
    lib = library(built)
    assert recorded(lib) and lib.stat().st_size > 60_000  # (so every cut below is really shorter)


@needs_gcc
@pytest.mark.parametrize("damage", [1_000, 20_000, 60_000, "unrecorded"])
def test_a_library_cut_short_or_unrecorded_is_rebuilt_not_loaded(built, tmp_path, damage):
    root = tmp_path / "root"
    shutil.copytree(built, root, symlinks=True)
    lib = library(root)
    whole = lib.read_bytes()
    if damage == "unrecorded":
        lib.with_name(lib.name + ".sha256").unlink()
    else:
        os.truncate(lib, damage)
    proc = probe(root)
    assert proc.returncode == 0 and proc.stdout.strip() == "right", (proc.returncode, proc.stderr)
    assert recorded(lib) and len(lib.read_bytes()) == len(whole)


def symbol_less(tmp_path: Path) -> tuple[Path, Path]:
    """A real shared library without any of the kernels, and a fake compiler that only ever builds that."""
    source = tmp_path / "other.c"
    source.write_text("int other(void) { return 1; }\n")
    fake = tmp_path / "fakecc"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo fakecc 1; exit 0; }\n'
        'out=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = -o ] && out="$a"; prev="$a"; done\n'
        f'exec {GCC} -shared -fPIC -o "$out" {source}\n'
    )
    fake.chmod(0o755)
    lib = tmp_path / "other.so"
    subprocess.run([str(fake), "-o", str(lib)], check=True)
    return lib, fake


@needs_gcc
def test_a_library_without_the_kernels_is_replaced_or_left_with_one_notice(built, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(built, root, symlinks=True)
    lib = library(root)
    other, fake = symbol_less(tmp_path)
    shutil.copyfile(other, lib)
    lib.with_name(lib.name + ".sha256").write_text(hashlib.sha256(lib.read_bytes()).hexdigest())
    proc = probe(root)
    assert proc.stdout.strip() == "right" and not proc.stderr, proc.stderr  # built in the temporary folder
    assert not lib.exists()  # and the stray one gone, so the next run rebuilds it in the cache

    proc = probe(tmp_path / "fresh", cc=str(fake))  # every build lacks the kernels: torch's run
    assert proc.returncode == 0 and proc.stdout.startswith("unavailable:"), proc.stderr
    assert "lacks a kernel" in proc.stdout and "gpt2load_gemv" in proc.stdout
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("gpt2load: notice: gpt2load's C kernels are unavailable, torch's run instead")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No library loaded yet; the process's library is back afterwards."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    native._library.cache_clear()
    yield tmp_path
    native._library.cache_clear()


def test_an_unsplittable_cc_is_one_notice(fresh, monkeypatch, capsys):
    monkeypatch.setenv("CC", 'gcc "-O2')
    assert not native.available()
    assert "CC='gcc \"-O2' is not a command line (No closing quotation)" in native.why_unavailable()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("gpt2load: notice:") and "is not a command line" in line


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    relative = Settings.from_env({"XDG_CACHE_HOME": "relative/cache"})
    assert native_build._folders(relative)[0] == tmp_path / "home" / ".cache" / "gpt2load" / "native"
    absolute = Settings.from_env({"XDG_CACHE_HOME": str(tmp_path / "abs")})
    assert native_build._folders(absolute)[0] == tmp_path / "abs" / "gpt2load" / "native"


@pytest.mark.skipif(shutil.which("cc") is None and GCC is None, reason="needs a C compiler to get this far")
def test_a_symlinked_temporary_folder_is_refused_and_its_target_left_alone(fresh, monkeypatch):
    """Another user can plant /tmp/gpt2load-native-UID -> a folder of ours: following it would chmod that
    folder to 0700 and build into it."""
    monkeypatch.setenv("CC", GCC or "cc")
    victim = fresh / "victim"
    victim.mkdir()
    victim.chmod(0o775)  # loose: the old code tightened it through the link
    (fresh / "tmp" / f"gpt2load-native-{os.getuid()}").symlink_to(victim)
    (fresh / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(fresh / "not-a-folder"))  # the cache folder cannot be made
    assert not native.available()
    assert "is a symlink or not a folder" in native.why_unavailable()
    assert victim.stat().st_mode & 0o777 == 0o775 and not list(victim.iterdir())
    assert native_build._own_folder(fresh / "tmp" / f"gpt2load-native-{os.getuid()}") is not None
    assert victim.stat().st_mode & 0o777 == 0o775
