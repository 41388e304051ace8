"""Hostile and mistaken inputs, table-driven: each case writes a bad file, runs the CLI in a subprocess under an
address-space cap of 3 GB above what importing gpt2load takes, and expects one `gpt2load: error:` line naming
the problem, exit 1, no traceback, and nothing written into the user's folder."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import OPENAI_TINY, TOKENIZER_DIR, add_tokenizer, assert_clean_error, copy_fixture, run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from tfwrite import tensor_entry, write_index  # noqa: E402

HEADROOM = 3 * 2**30  # far above what any of these needs to fail; far below what an unchecked size takes


@pytest.fixture(scope="module")
def memory_limit() -> int:
    """The cap: the address space `import gpt2load` takes here (a CUDA build of torch maps GBs more than the CPU
    build without touching them), plus the headroom."""
    code = "import gpt2load; print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout) * 1024 + HEADROOM


GENERATE = ("generate", "--prompt", "A", "--max-new-tokens", "1", "--device", "cpu", "--model")


def tiny(tmp: Path, tokenizer: tuple[str, str] = ("encoder.json", "vocab.bpe")) -> Path:
    """A working tiny OpenAI-layout model with a tokenizer: the cases below break one thing in it."""
    return add_tokenizer(copy_fixture("openai-tiny", tmp), tokenizer)


def hparams(**changes) -> Callable[[Path], Path]:
    """A tiny model whose hparams.json has `changes` (JSON text values written as they are)."""

    def make(tmp: Path) -> Path:
        d = tiny(tmp)
        hp = json.loads((OPENAI_TINY / "hparams.json").read_text())
        text = json.dumps({k: changes.get(k, v) for k, v in hp.items()})
        for v in changes.values():
            if isinstance(v, RawJSON):
                text = text.replace(json.dumps(v), v.text)
        (d / "hparams.json").write_text(text)
        return d

    return make


class RawJSON(str):
    """A value spliced into JSON text verbatim (NaN is not valid JSON, but Python writes and reads it)."""

    def __new__(cls, text: str):
        obj = super().__new__(cls, f"@raw:{text}")
        obj.text = text
        return obj


def hf_folder(config: str) -> Callable[[Path], Path]:
    """A Hugging Face-layout folder with the given config.json text and a stub model.safetensors."""

    def make(tmp: Path) -> Path:
        d = tmp / "hf"
        d.mkdir()
        (d / "config.json").write_text(config)
        (d / "model.safetensors").write_bytes(safetensors_bytes(b"{}"))
        return d

    return make


def safetensors_bytes(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def safetensors(header: object | bytes) -> Callable[[Path], Path]:
    """A .safetensors file with this header (a JSON value, or raw bytes) and a few data bytes."""

    def make(tmp: Path) -> Path:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        p = tmp / "model.safetensors"
        p.write_bytes(safetensors_bytes(raw) + bytes(16))
        return p

    return make


def tf_negative_dim(tmp: Path) -> Path:
    """A TensorFlow index whose tensor has dimension -1 (int64 two's complement on the wire)."""
    d = tiny(tmp)
    write_index(d, [(b"model/wte", tensor_entry((2**64 - 1, 24), 0, 0, 0))])
    return d


def checkpoint_not_utf8(tmp: Path) -> Path:
    d = tiny(tmp)
    (d / "checkpoint").write_bytes(b'model_checkpoint_path: "\xff\xfe model.ckpt"\n')
    return d


def merges(edit: Callable[[list[str]], list[str]] | None = None, raw: bytes | None = None) -> Callable:
    """A tiny model with Hugging Face tokenizer names (not hash-pinned) and an edited merges.txt."""

    def make(tmp: Path) -> Path:
        d = tiny(tmp, ("vocab.json", "merges.txt"))
        if raw is not None:
            (d / "merges.txt").write_bytes(raw)
        else:
            lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
            (d / "merges.txt").write_text("\n".join(edit(lines)), encoding="utf-8")
        return d

    return make


def swap(i: int, j: int) -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        lines = list(lines)
        lines[i], lines[j] = lines[j], lines[i]
        return lines

    return edit


def vocab_json(text: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        d = tiny(tmp, ("vocab.json", "merges.txt"))
        (d / "vocab.json").write_text(text)
        return d

    return make


def pth(obj: object) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / "model.pth"
        torch.save(obj, p)
        return p

    return make


def flags(*extra: str, env: dict[str, str] | None = None) -> Callable[[Path], tuple[Path, tuple, dict]]:
    """A working tiny model, with bad command-line flags or environment."""

    def make(tmp: Path):
        return tiny(tmp), extra, env or {}

    return make


def own_config(**cfg) -> dict:
    base = {"vocab_size": 96, "context_length": 32, "emb_dim": 24, "n_heads": 3, "n_layers": 2}
    return {"__metadata__": {"format": "gpt2load", "config": json.dumps({**base, **cfg})}}


TENSOR = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
DEEP = 100_000

CASES = [
    # config values: type, range, ceiling (hparams.json of an otherwise working model)
    ("n_layer-1e9", hparams(n_layer=1_000_000_000), "n_layers=1000000000"),
    ("n_head-0", hparams(n_head=0), "n_heads=0"),
    ("n_ctx-negative", hparams(n_ctx=-32), "context_length=-32"),
    ("n_head-null", hparams(n_head=None), "n_heads=None"),
    ("n_layer-NaN", hparams(n_layer=RawJSON("NaN")), "n_layers=nan"),
    ("n_layer-string", hparams(n_layer="2"), "n_layers='2'"),
    ("n_head-bool", hparams(n_head=True), "n_heads=True"),
    ("n_embd-float", hparams(n_embd=24.0), "emb_dim=24.0"),
    ("width-over-ceiling", hparams(n_embd=65536, n_head=1, n_layer=4096), "parameters"),
    # config.json
    ("config-bad-json", hf_folder("{"), "not valid JSON"),
    ("config-not-object", hf_folder("[1, 2]"), "not an object"),
    ("config-own-lacks-config", hf_folder('{"model_type": "gpt2load"}'), "config.json"),
    (
        "config-hf-null",
        hf_folder(json.dumps({"vocab_size": 96, "n_positions": 32, "n_embd": 24, "n_head": 3, "n_layer": None})),
        "n_layers=None",
    ),  # fmt: skip
    # safetensors headers
    ("st-header-list", safetensors([1]), "not a JSON object"),
    ("st-no-offsets", safetensors({"tok_emb.weight": {"dtype": "F32", "shape": [2, 2]}}), "data_offsets"),
    ("st-offsets-strings", safetensors({"w": {**TENSOR, "data_offsets": ["0", "16"]}}), "data_offsets"),
    ("st-negative-shape", safetensors({"tok_emb.weight": {**TENSOR, "shape": [-1, 24]}}), "shape"),
    ("st-float-shape", safetensors({"tok_emb.weight": {**TENSOR, "shape": [2.5, 2]}}), "shape"),
    ("st-deep-nesting", safetensors(b'{"a":' + b"[" * DEEP + b"]" * DEEP + b"}"), "not a safetensors file"),
    ("st-metadata-list", safetensors({"__metadata__": [1]}), "__metadata__"),
    ("st-own-config-null", safetensors(own_config(n_layers=None)), "n_layers=None"),
    # TensorFlow checkpoints
    ("tf-negative-dim", tf_negative_dim, "negative"),
    ("tf-checkpoint-not-utf8", checkpoint_not_utf8, "not UTF-8"),
    # tokenizer files
    ("merges-one-part", merges(lambda ls: ls[:5] + ["Ġt"] + ls[6:]), "merges.txt line"),
    ("merges-not-utf8", merges(raw=b"#version: 0.2\n\xff\xfe \xfd\n"), "not UTF-8"),
    ("merges-swapped-late", merges(swap(1000, 1001)), "do not belong together"),
    ("vocab-not-object", vocab_json("[1]"), "not a JSON object"),
    # book .pth
    ("pth-non-tensor", pth({"tok_emb.weight": 5}), "not a tensor"),
    # command line and environment
    ("seed-2**70", flags("--seed", str(2**70)), "--seed"),
    ("max-new-tokens-1e18", flags("--max-new-tokens", str(10**18)), "--max-new-tokens"),
    ("device-meta", flags("--device", "meta"), "meta holds only shapes"),
    ("no-cache-env", flags(env={"GPT2LOAD_NO_CACHE": "perhaps"}), "GPT2LOAD_NO_CACHE"),
]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize(("make", "needle"), [pytest.param(m, n, id=i) for i, m, n in CASES])
def test_hostile_input_is_one_clean_line(tmp_path, make, needle, memory_limit):
    made = make(tmp_path)
    model, extra, env = made if isinstance(made, tuple) else (made, (), {})
    before = _files(tmp_path)
    proc = run_cli(*GENERATE, str(model), *extra, env=env, memory_limit=memory_limit)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert_clean_error(proc, needle)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _files(tmp_path) == before  # nothing written beside the user's files (the cache lives elsewhere)


def test_tokenizer_files_are_real():
    """The tokenizer cases edit the real files: make sure the unedited pair is what they start from."""
    assert (TOKENIZER_DIR / "encoder.json").is_file() and (TOKENIZER_DIR / "vocab.bpe").is_file()
