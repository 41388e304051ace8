"""Throughput of `gpt2load serve` with 1, 4 and 8 concurrent clients: what batching across requests buys.

A real server in a subprocess (torch's default thread count) holds random weights of the chosen shape; each
client sends --requests greedy completions one after another (a short prompt, exactly --max-tokens new tokens),
all clients at once. Requests/s and completion tokens/s are over the wall time of the whole round; the speed-up
is against one client (requests served one at a time).

    python scripts/bench.py serve [--shape 124M|tiny] [--clients 1,4,8] [--requests 2] [--max-tokens 64]

Then the server's memory under a full queue: while one long request holds the decoding thread, clients queue
requests of --max-choices choices each (with penalties, whose state is the costly part) until the server says
503 queue_full; the server's resident memory before and after is read from /proc.
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


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def queue_memory(url: str, model: str, pid: int, choices: int, context: int) -> tuple[int, float]:
    """(choices queued until 503, the server's RSS growth in MB) with the decoding thread busy."""
    long = {"model": model, "prompt": PROMPTS[0], "max_tokens": context - 16, "temperature": 0}
    holder = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=long, timeout=600))
    holder.start()
    time.sleep(1.0)
    before, queued, waiting = resident_mb(pid), 0, []
    body = {
        "model": model,
        "prompt": [f"{p} {i}" for i in range(choices // 16) for p in PROMPTS[:1]],
        "n": 16,
        "max_tokens": 16,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
    }

    def send(out: list) -> None:
        out.append(httpx.post(url + "/v1/completions", json=body, timeout=600).status_code)

    while True:
        status: list = []
        t = threading.Thread(target=send, args=(status,))
        t.start()
        t.join(2.0)  # a queued request stays open; a refused one returns at once
        if status and status[0] == 503:
            break
        waiting.append(t)
        queued += (choices // 16) * 16
    grown = resident_mb(pid) - before
    httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}, timeout=1)
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
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / args.shape, SHAPES[args.shape])
        flags = ("--model", str(folder), "--max-batch-size", str(args.max_batch_size))
        with ServeProcess(*flags, threads=args.threads) as s:
            round_trip(s.url, args.shape, 1, 1, 4)  # warm-up
            if args.queue_memory:
                queued, grown = queue_memory(s.url, args.shape, s.proc.pid, 128, SHAPES[args.shape].context_length)
                print(
                    f"{args.shape}: {queued} choices queued (with penalties) until 503; server RSS grew {grown:.1f} MB"
                )
                s.proc.kill()
                return 0
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
