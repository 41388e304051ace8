"""Throughput of `gpt2load serve` with 1, 4 and 8 concurrent clients: what batching across requests buys.

A real server in a subprocess (torch's default thread count) holds random weights of the chosen shape; each
client sends --requests greedy completions one after another (a short prompt, exactly --max-tokens new tokens),
all clients at once. Requests/s and completion tokens/s are over the wall time of the whole round; the speed-up
is against one client (requests served one at a time).

    python scripts/bench.py serve [--shape 124M|tiny] [--clients 1,4,8] [--requests 2] [--max-tokens 64]

--queue-memory instead measures what waiting choices cost: a Batcher (the server's decoding engine) is held in
a prefill while requests of 128 choices with penalties fill its queue up to the default 4096 waiting choices.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the server fixture and model maker

from helpers import TOKENIZER_DIR  # noqa: E402
from serveserver import ServeProcess, make_model  # noqa: E402

from gpt2load.model.config import PRESETS, GPTConfig  # noqa: E402

SHAPES = {"124M": PRESETS["124M"], "tiny": GPTConfig(context_length=256, emb_dim=32, n_heads=2, n_layers=2)}
PROMPTS = [
    "Every effort moves you",
    "The quick brown fox",
    "In the beginning was",
    "Once upon a time, there",
    "The results of the experiment",
    "She opened the door and",
    "Machine learning is",
    "The river flows",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def round_trip(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[float, int]:
    """All clients at once, each sending `requests` completions in turn: (seconds, completion tokens)."""
    tokens = [0] * clients

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {
                    "model": model,
                    "prompt": PROMPTS[(c + r) % len(PROMPTS)],
                    "max_tokens": max_tokens,
                    "min_tokens": max_tokens,  # no early EOS: every request costs the same
                    "temperature": 0,
                }
                answer = http.post(url + "/v1/completions", json=body)
                answer.raise_for_status()
                tokens[c] += answer.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(tokens)


def queue_memory(shape: GPTConfig, max_queued_choices: int) -> tuple[int, float]:
    """(choices queued, RSS growth in MB) of filling a Batcher's queue with requests of 128 choices with penalties
    (their costly state) while its decoding thread is held in a prefill: what waiting choices cost."""
    import torch

    from gpt2load.model.gpt import GPTModel
    from gpt2load.serve.batcher import Batcher, QueueFull
    from gpt2load.serve.sequence import Request, SamplingParams
    from gpt2load.tokenizer import tokenizer_from_folder

    statm = Path("/proc/self/statm")
    model = GPTModel(shape).eval()
    gate = threading.Event()
    model.register_forward_pre_hook(lambda module, args: None if gate.wait() else None)
    batcher = Batcher(model, tokenizer_from_folder(TOKENIZER_DIR), 8, 64, max_queued_choices=max_queued_choices)
    try:
        batcher.submit(Request([[1, 2]], 1, SamplingParams(max_tokens=1), lambda e: None))  # holds the thread
        time.sleep(0.5)
        before = int(statm.read_text().split()[1]) * 4096 / 2**20
        params = SamplingParams(max_tokens=16, temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5)
        queued = 0
        with torch.inference_mode():
            while True:
                try:
                    batcher.submit(Request([[100 + i] * 8 for i in range(8)], 16, params, lambda e: None, False))
                except QueueFull:
                    break
                queued += 128
        grown = int(statm.read_text().split()[1]) * 4096 / 2**20 - before
    finally:
        gate.set()
        batcher.close()
    return queued, grown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.py serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="124M", help="random weights of this shape")
    p.add_argument("--clients", default="1,4,8", help="concurrent clients to measure, comma-separated")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: torch's own)")
    p.add_argument("--queue-memory", action="store_true", help="only the memory under a full queue")
    args = p.parse_args(argv)
    if args.queue_memory:
        queued, grown = queue_memory(SHAPES[args.shape], 4096)
        print(f"{queued} choices waiting (128 per request, with penalties): RSS grew {grown:.1f} MB", flush=True)
        return 0
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / args.shape, SHAPES[args.shape])
        flags = ("--model", str(folder), "--max-batch-size", str(args.max_batch_size))
        with ServeProcess(*flags, threads=args.threads) as s:
            round_trip(s.url, args.shape, 1, 1, 4)  # warm-up
            print(f"gpt2load serve, {args.shape}-shaped random weights, fp32, {cpu_name()}")
            print(f"each client: {args.requests} requests x {args.max_tokens} new tokens (greedy)\n")
            print("| concurrent clients | requests/s | tokens/s | vs 1 client |")
            print("|---:|---:|---:|---:|")
            base = None
            for c in counts:
                seconds, tokens = round_trip(s.url, args.shape, c, args.requests, args.max_tokens)
                rate = tokens / seconds
                base = base or rate
                print(f"| {c} | {c * args.requests / seconds:.2f} | {rate:.1f} | {rate / base:.2f}x |", flush=True)
            peak = httpx.get(s.url + "/health").json()["peak_batch"]
            print(f"\nlargest batch decoded in one step: {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
