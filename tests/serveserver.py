"""`gpt2load serve` in a subprocess on 127.0.0.1 (a free port it picks itself), and tiny models to serve.

with ServeProcess("--model", str(folder)) as server:
    openai.OpenAI(base_url=server.base_url, api_key="x")
    server.log()    # what the server wrote to stderr so far
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from helpers import TOKENIZER_DIR

from gpt2load import GPTConfig, GPTModel
from gpt2load.formats.exports import save_model
from gpt2load.tokenizer import EOT_ID


def make_model(
    folder: Path, cfg: GPTConfig, seed: int = 0, eos_first: bool = False, template: str | None = None
) -> Path:
    """A random model in gpt2load's folder form with the real tokenizer files. Its embeddings are small, so the
    blocks' output (which mixes the context) dominates and a batching mistake changes the text.

    eos_first: bias the final norm towards <|endoftext|>'s embedding, so EOS is always the most likely token.
    template: recorded as `prompt_template` in config.json (an instruction fine-tuned model's marker).
    """
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        model.tok_emb.weight.mul_(0.1)
        model.pos_emb.weight.mul_(0.1)
    if eos_first:
        with torch.no_grad():
            e = model.tok_emb.weight[EOT_ID]
            e.mul_(5)
            model.final_norm.shift.copy_(10 * e / e.norm())
    save_model(model, folder, tokenizer_dir=TOKENIZER_DIR)
    if template is not None:
        meta = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**meta, "prompt_template": template}))
    return folder


class ServeProcess:
    def __init__(
        self, *args: str, timeout: float = 180, threads: int | None = 1, env: dict[str, str] | None = None
    ) -> None:
        """threads: the server's OMP_NUM_THREADS (None: torch's default, as a user would run it).
        env: more environment variables for the server."""
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2load", "serve", *args, "--port", "0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._port = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port.wait(timeout) or not hasattr(self, "url"):
            self.stop()
            raise RuntimeError(f"the server did not start:\n{self.log()}")
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server did not become ready:\n{self.log()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        """/health answers 200; a refused connection (the socket is announced a moment before it accepts) is not
        ready yet, not a failure."""
        try:
            return httpx.get(self.url + "/health").status_code == 200
        except httpx.ConnectError:
            return False

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on http://[0-9.]+:(\d+)", line)  # 127.0.0.1 reaches 0.0.0.0 too
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                self.base_url = self.url + "/v1"
                self._port.set()
        self._port.set()  # the server exited: stop waiting for a port it will not announce

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
