"""The server's decoding thread survives anything one request does: a bad row fails alone, a failed forward or a
dead thread is recovered from (or reported by /health), cancellation is honoured at once, queues are bounded."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from helpers import TOKENIZER_DIR, served_model
from serveserver import ServeProcess, make_model

from gpt2load import GPTConfig, beam_search
from gpt2load.serve.app import ServerState, create_app
from gpt2load.serve.batcher import Batcher, QueueFull
from gpt2load.serve.protocol import Limits
from gpt2load.serve.sequence import Failure, Finish, Piece, Request, SamplingParams
from gpt2load.tokenizer import EOT_ID, tokenizer_from_folder

TINY = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2)
LONG = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=32, n_heads=2, n_layers=2)


@pytest.fixture(scope="module")
def model():
    return served_model(TINY)


@pytest.fixture(scope="module")
def enc():
    return tokenizer_from_folder(TOKENIZER_DIR)


class Collect:
    """A request's consumer: its tokens, Failure, and whether it has finished (every choice, or failed)."""

    def __init__(self, choices: int = 1, fail_on_piece: int | None = None) -> None:
        self.tokens: list[int] = []
        self.failure: Failure | None = None
        self.finished, self.left, self.pieces = threading.Event(), choices, 0
        self.fail_on_piece = fail_on_piece

    def __call__(self, event: object) -> None:
        if isinstance(event, Piece):
            self.pieces += 1
            if self.pieces == self.fail_on_piece:
                raise BrokenPipeError("the consumer's socket is gone")
            self.tokens += [t.id for t in event.tokens]
        elif isinstance(event, Failure):
            self.failure = event
            self.finished.set()
        elif isinstance(event, Finish):
            self.left -= 1
            if not self.left:
                self.finished.set()

    def wait(self, timeout: float = 60) -> Collect:
        assert self.finished.wait(timeout), "no answer"
        return self


def submit(batcher: Batcher, prompt: list[int], stream: bool = True, n: int = 1, **params) -> Collect:
    c = Collect(len([prompt]) * n, params.pop("fail_on_piece", None))
    batcher.submit(Request([prompt], n, SamplingParams(logprobs=0, **params), c, stream))
    return c


def plain_loop(model, prompt: list[int], steps: int) -> list[int]:
    """The reference: the whole sequence through the model at every step, no cache, argmax."""
    idx, new = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(steps):
            t = int(model(idx)[0, -1].argmax())
            if t == EOT_ID:
                break
            new.append(t)
            idx = torch.cat([idx, torch.tensor([[t]])], 1)
    return new


PROMPTS = [list(range(200 + 7 * i, 240 + 7 * i)) for i in range(3)]


def test_a_failing_row_fails_only_its_request(model, enc):
    batcher = Batcher(model, enc, max_batch_size=4)
    try:
        # Row 0's consumer breaks mid-decode: its row leaves and the last row moves into it (cache.move).
        broken = submit(batcher, PROMPTS[0], max_tokens=30, temperature=0.0, fail_on_piece=4)
        good = [submit(batcher, p, max_tokens=30, temperature=0.0) for p in PROMPTS[1:]]
        bad = submit(batcher, PROMPTS[0], max_tokens=30, temperature=1.0, top_k=0)  # slipped past validation
        tiny = submit(batcher, PROMPTS[0], max_tokens=30, temperature=9e-39)
        assert "BrokenPipeError" in broken.wait().failure.message
        assert bad.wait().failure is not None
        for c, p in zip(good, PROMPTS[1:], strict=True):
            assert c.wait().failure is None and c.tokens == plain_loop(model, p, 30)
        assert tiny.wait().failure is None and tiny.tokens == plain_loop(model, PROMPTS[0], 30)  # T -> 0: greedy
        assert batcher.alive and batcher.stats()["restarts"] == 0
    finally:
        batcher.close()


def test_a_failed_forward_fails_its_rows_and_serving_goes_on(model, enc):
    batcher = Batcher(model, enc, max_batch_size=4)
    fired = []

    def oom_once(module, args):  # a decode step of two rows or more, as an out-of-memory there would be
        if args[0].shape[0] > 1 and not fired:
            fired.append(1)
            raise RuntimeError("out of memory (simulated)")

    hook = model.register_forward_pre_hook(oom_once)
    try:
        first = [submit(batcher, p, max_tokens=30, temperature=0.0) for p in PROMPTS[:2]]
        assert all("out of memory" in c.wait().failure.message for c in first)
        hook.remove()
        again = [submit(batcher, p, max_tokens=30, temperature=0.0) for p in PROMPTS]
        for c, p in zip(again, PROMPTS, strict=True):
            assert c.wait().failure is None and c.tokens == plain_loop(model, p, 30)
    finally:
        hook.remove()
        batcher.close()


class Crash(BaseException):
    """Not an Exception: what a step's error handling does not catch, so the decoding thread ends."""


def _serve_in_process(state: ServerState) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_dead_thread_restarts_once_then_health_says_503(model, enc):
    fatal: list[BaseException] = []
    crashes = [0]

    def crash(module, args):
        if crashes[0]:
            crashes[0] -= 1
            raise Crash("the decoding thread was hit")

    batcher = Batcher(model, enc, max_batch_size=4, on_fatal=fatal.append)
    state = ServerState(Limits("tiny", TINY.vocab_size, TINY.context_length), enc, batcher=batcher)
    server, thread, url = _serve_in_process(state)
    hook = model.register_forward_pre_hook(crash)
    try:
        assert httpx.get(url + "/health").status_code == 200
        crashes[0] = 1
        hit = submit(batcher, PROMPTS[0], max_tokens=10, temperature=0.0).wait()
        assert "Crash" in hit.failure.message
        after = submit(batcher, PROMPTS[1], max_tokens=10, temperature=0.0).wait()  # answered by the new thread
        assert after.failure is None and after.tokens == plain_loop(model, PROMPTS[1], 10)
        health = httpx.get(url + "/health")
        assert health.status_code == 200 and health.json()["restarts"] == 1 and not fatal

        crashes[0] = 1  # a second death soon after the first: stopped for good
        assert "Crash" in submit(batcher, PROMPTS[0], max_tokens=10, temperature=0.0).wait().failure.message
        batcher.thread.join(10)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert len(fatal) == 1 and isinstance(fatal[0], Crash) and not batcher.alive
        with pytest.raises(QueueFull, match="restart"):
            submit(batcher, PROMPTS[0], max_tokens=10)
    finally:
        hook.remove()
        server.should_exit = True
        thread.join(10)
        batcher.close()


def test_a_cancelled_request_leaves_at_once_and_its_queue_is_dropped(model, enc):
    """20 prompts x n 100 with penalties (2,000 choices), not streamed, cancelled after its first choice: the
    forwards that follow are the next request's own, give or take the round in flight."""
    batcher = Batcher(model, enc, max_batch_size=4)
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
    try:
        big = Collect(2000)
        params = SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=0.5, repetition_penalty=1.3)
        request = Request([[100 + i] * 5 for i in range(20)], 100, params, big, stream=False)
        batcher.submit(request)
        assert batcher.stats()["queued_choices"] <= 2000
        deadline = time.monotonic() + 30
        while big.left == 2000:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        request.cancel()
        before = forwards[0]
        small = submit(batcher, PROMPTS[0], max_tokens=5, temperature=0.0).wait(10)
        assert small.failure is None and small.tokens == plain_loop(model, PROMPTS[0], 5)
        assert forwards[0] - before <= 6 + 2 * 4 + 1  # its prefill and 5 steps; a round of 4 joining, one step
        assert batcher.stats()["queued_choices"] == 0 and big.left > 1900
    finally:
        hook.remove()
        batcher.close()


def test_queue_limits_count_requests_and_choices(model, enc):
    gate = threading.Event()

    def hold(module, args) -> None:
        gate.wait(30)

    hook = model.register_forward_pre_hook(hold)
    batcher = Batcher(model, enc, max_batch_size=1, max_queue=3, max_queued_choices=10)
    try:
        first = submit(batcher, PROMPTS[0], max_tokens=2, temperature=0.0)  # taken, blocked in its prefill
        deadline = time.monotonic() + 10
        while batcher.stats()["queued"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = [submit(batcher, PROMPTS[1], n=4, max_tokens=2, temperature=0.0) for _ in range(2)]  # 8 choices
        with pytest.raises(QueueFull, match="limit of 10"):
            submit(batcher, PROMPTS[1], n=3, max_tokens=2)
        beams = Collect()
        with pytest.raises(QueueFull, match="limit of 10"):  # 1 prompt x 4 beams counts 4
            batcher.submit(Request([PROMPTS[2]], 1, SamplingParams(max_tokens=2, num_beams=4), beams))
        queued.append(submit(batcher, PROMPTS[1], n=2, max_tokens=2, temperature=0.0))  # 10 choices: fits
        with pytest.raises(QueueFull, match="requests are already waiting"):
            submit(batcher, PROMPTS[1], max_tokens=2)
        gate.set()
        for c in [first, *queued]:
            assert c.wait().failure is None
    finally:
        gate.set()
        hook.remove()
        batcher.close()


def test_beam_search_stops_when_asked(model):
    steps = [0]
    hook = model.register_forward_pre_hook(lambda m, a: steps.__setitem__(0, steps[0] + 1))
    try:
        beam_search(model, torch.tensor([PROMPTS[0]]), 50, 4, eos_id=None, should_stop=lambda: steps[0] >= 3)
    finally:
        hook.remove()
    assert steps[0] == 3  # the prompt and two steps, of 50


# The real server, in a subprocess, with a context long enough for slow requests.


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess("--model", str(make_model(tmp_path_factory.mktemp("robust") / "long", LONG))) as s:
        yield s


def complete(server, **body) -> httpx.Response:
    return httpx.post(server.base_url + "/completions", json={"model": "long", **body}, timeout=60)


def test_tiny_temperatures_decode_greedily_and_the_other_request_is_untouched(server):
    other = {"prompt": [100 + i for i in range(80)], "max_tokens": 900, "temperature": 0}
    alone = complete(server, **other).json()["choices"][0]["text"]
    greedy = complete(server, prompt="Every effort moves you", max_tokens=20, temperature=0).json()
    texts = []
    with httpx.stream("POST", server.base_url + "/completions", json={"model": "long", "stream": True, **other}) as r:
        lines = r.iter_lines()
        seen = [next(lines)]  # the other request is decoding
        for t in (9e-39, 1e-300):
            got = complete(server, prompt="Every effort moves you", max_tokens=20, temperature=t)
            assert got.status_code == 200, got.text
            texts.append(got.json()["choices"][0]["text"])
        assert httpx.get(server.url + "/health").json()["active"] == 1  # still decoding meanwhile
        seen += lines
    streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in seen if line.startswith("data: {"))
    assert texts == [greedy["choices"][0]["text"]] * 2
    assert streamed == alone and len(alone) > 100


def test_a_streamed_beam_search_whose_client_leaves_stops(server):
    """Alone, this search takes tens of seconds (its first chunk comes after the first prompt's search)."""
    body = {"prompt": [[100 + i] * 4 for i in range(4)], "num_beams": 16, "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", server.base_url + "/completions", json={"model": "long", **body}) as r:
        assert r.status_code == 200
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").json()["active"] < 16:  # the beams are running
            assert time.monotonic() < deadline
            time.sleep(0.05)
    start = time.monotonic()  # the client has gone
    small = complete(server, prompt="Every effort moves you", max_tokens=2, temperature=0)
    assert small.status_code == 200 and time.monotonic() - start < 5, server.log()[-2000:]
