"""What the training tests share: the tiny model and corpus, the `train` command line, its outputs, and
torchrun on 127.0.0.1 (gloo, one thread per process)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch
from helpers import TOKENIZER_DIR
from safetensors.torch import load_file

from gpt2load.formats.exports import save_model
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel

CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = ["--context-length", "16", "--eval-batches", "2", "--lr", "3e-3", "--quiet", "--device", "cpu"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def make_model(folder: Path) -> Path:
    """A tiny random model with GPT-2's real vocabulary, saved in gpt2load's own form with the tokenizer."""
    torch.manual_seed(0)
    model = GPTModel(CFG)
    with torch.no_grad():
        model.tok_emb.weight.mul_(0.05)  # GPT-2-like scale, so the starting loss is near log(vocab)
    return save_model(model, folder, tokenizer_dir=TOKENIZER_DIR)


def make_corpus(folder: Path) -> Path:
    rng = random.Random(0)
    subj = ["the cat", "a dog", "my friend", "the teacher", "our neighbour"]
    verb = ["sees", "likes", "finds", "paints", "follows"]
    obj = ["the ball", "a red house", "the river", "an old book", "the garden"]
    lines = [f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(700)]
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_cmd(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(corpus), "--out", str(out), *COMMON, *extra]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt2load", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def metrics(out: Path, drop=("tokens_per_s",)) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def max_diff(a: Path, b: Path, skip: str = "$") -> float:
    sa, sb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa if not k.endswith(skip))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """`torchrun --nproc_per_node N ARGS` on a free local port (ARGS: `-m gpt2load ...` or a script)."""
    port = str(free_port())
    return [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", port, *args]


def torchrun(*args: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """`gpt2load ARGS` in N processes under torchrun."""
    cmd = torchrun_cmd("-m", "gpt2load", *args, nproc=nproc)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
