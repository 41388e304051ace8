"""`gpt2load serve` against hostile clients: oversized and malformed bodies, huge numbers and strings, too many
choices or log-probabilities, foreign Host headers and content types, API keys from every source, and clients that
give up. Each answer is checked (status, OpenAI's error shape, the field named, a short message), then that the
server still answers and that the user's text stayed out of its log."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
from helpers import assert_clean_error, run_cli
from serveserver import ServeProcess, make_model

from gpt2load import GPTConfig

TINY = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=2)
JSON = {"content-type": "application/json"}
BODY = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("hostile") / "tiny", TINY)


@pytest.fixture(scope="module")
def server(tiny_dir):
    args = ("--max-choices", "8", "--max-logprob-entries", "2000", "--allowed-hosts", "proxy.example")
    with ServeProcess("--model", str(tiny_dir), *args) as s:
        yield s


def raw(server, head: str, body: bytes = b"", timeout: float = 20) -> tuple[int, dict, bytes]:
    """One request over a plain socket (`head`: the request line and headers, without the blank line); the server's
    status, headers and body. Whatever the server does not read of `body` is not waited for."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n")
        try:
            sock.sendall(body)
        except OSError:  # the server answered and closed before reading it all
            pass
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(ln.lower().split(": ", 1) for ln in lines[1:])
    return int(lines[0].split()[1]), headers, rest


def post(server, body: bytes, path: str = "/completions", **headers: str) -> httpx.Response:
    return httpx.post(server.base_url + path, content=body, headers={**JSON, **headers}, timeout=60)


def error_of(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The error of an answer expected to fail: OpenAI's shape, the field named, a message that quotes no more than
    a short prefix of the user's values."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and (code is None or err["code"] == code), err
    assert len(r.content) < 400, r.content[:500]
    return err


def assert_alive(server) -> None:
    r = httpx.post(server.base_url + "/completions", json=BODY, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------------------------------------------------------
# Size: the body, the choices, the log-probabilities


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    big = 100_000_000
    t = time.monotonic()
    # A declared length over the limit: answered from the headers, before a byte of the body is sent.
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    status, _, body = raw(server, f"{head}Content-Length: {big}")
    assert status == 413 and b"request_too_large" in body and b"--max-body-bytes" in body
    # Chunked: no length to look at first; cut off once 2 MiB (the default) have arrived, not at the end. The server
    # closes with the rest unread, so the client may see a reset instead of the 413: the log has it.
    sent = 0
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=20) as sock:
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        with pytest.raises(OSError):  # broken pipe or reset: the server stopped reading
            while sent < big:
                sock.sendall(chunk)
                sent += len(chunk)
    assert sent < 20_000_000, sent  # 2 MiB read, the rest of what was sent sat in socket buffers
    assert time.monotonic() - t < 15  # neither waited for the rest (the socket's timeout is 20 s)
    time.sleep(0.2)
    assert len([ln for ln in server.lines if "status=413" in ln]) == 2
    # At the limit exactly: accepted.
    body = httpx.Request("POST", "/", json=BODY).content
    r = post(server, body + b" " * (2 * 1024 * 1024 - len(body)))
    assert r.status_code == 200, r.text
    assert_alive(server)


@pytest.mark.parametrize(
    ("change", "param"),
    [({"n": 3, "prompt": ["a", "b", "c"]}, "n"), ({"prompt": ["a"] * 9}, "prompt"), ({"num_beams": 9}, "num_beams")],
    ids=["prompts-x-n", "prompts", "num_beams"],
)
def test_choices_per_request_are_bounded(server, change, param):
    r = httpx.post(server.base_url + "/completions", json={**BODY, "temperature": None, **change})
    err = error_of(r, 400, param, "too_many_choices")
    assert "--max-choices" in err["message"]
    assert_alive(server)


def test_choices_at_the_limit_are_served(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    r = c.completions.create(model="tiny", prompt=["a", "b"], n=4, max_tokens=2)
    assert sorted(ch.index for ch in r.choices) == list(range(8))


def test_logprobs_answers_are_bounded(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    prompt = "word " * 40  # 40 tokens
    with pytest.raises(openai.BadRequestError) as e:  # (40 echoed + 10) x 8 choices x 6 = 2400 > 2000
        c.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=5, n=8, max_tokens=10)
    assert e.value.body["param"] == "logprobs" and e.value.body["code"] == "too_many_logprobs"
    r = c.completions.create(model="tiny", prompt=prompt, logprobs=5, n=8, max_tokens=10)  # 480
    assert all(len(ch.logprobs.top_logprobs) == 10 for ch in r.choices)
    # Exactly at the limit: 100 tokens x 20; one more token is over.
    r = c.completions.create(model="tiny", prompt=prompt, logprobs=19, max_tokens=100, extra_body={"min_tokens": 100})
    assert len(r.choices[0].logprobs.tokens) == 100
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=prompt, logprobs=19, max_tokens=101)
    assert e.value.body["param"] == "logprobs" and "--max-logprob-entries" in e.value.body["message"]


# ---------------------------------------------------------------------------------------------------------------
# The parser and the numeric fields


def test_deeply_nested_json_is_400(server):
    r = post(server, b"[" * 100_000 + b"]" * 100_000)
    assert "nests deeper" in error_of(r, 400)["message"]
    r = post(server, b'{"model": "tiny", "prompt": "Hi", "x": ' + b"[" * 65 + b"]" * 65 + b"}")
    error_of(r, 400)
    # Brackets inside strings are text: a prompt of 200 of them is served.
    r = post(server, b'{"model": "tiny", "max_tokens": 1, "prompt": "' + b"[{" * 100 + b'\\"]"}')
    assert r.status_code == 200, r.text
    assert_alive(server)


HUGE = [
    ('"max_tokens": ' + "9" * 5000, "max_tokens"),
    ('"temperature": ' + "1" * 400, "temperature"),
    ('"temperature": 1' + "0" * 400 + ".5", "temperature"),
    ('"temperature": 1e999', "temperature"),
    ('"temperature": NaN', "temperature"),
    ('"top_p": -Infinity', "top_p"),
    ('"seed": 1' + "0" * 30, "seed"),
    ('"n": ' + "7" * 100, "n"),
    ('"prompt": [1' + "0" * 60 + "]", "prompt"),
]


@pytest.mark.parametrize(("field", "param"), HUGE, ids=[f[:24] for f, _ in HUGE])
def test_huge_numbers_are_400_naming_the_field(server, field, param):
    r = post(server, ('{"model": "tiny", "prompt": "Hi", ' + field + "}").encode())
    err = error_of(r, 400, param)
    assert len(err["message"]) < 200
    assert_alive(server)


def test_huge_strings_are_quoted_short_and_not_logged(server):
    x = "q" * 1_000_000
    err = error_of(httpx.post(server.base_url + "/completions", json={**BODY, "temperature": x}), 400, "temperature")
    assert "qqqq" in err["message"] and len(err["message"]) < 200
    err = error_of(httpx.post(server.base_url + "/completions", json={**BODY, "model": x}), 404, "model")
    assert "model_not_found" == err["code"] and len(err["message"]) < 200
    r = httpx.get(server.base_url + "/models/" + "q" * 4000)
    assert r.status_code == 404 and len(r.content) < 400
    assert_alive(server)
    assert "q" * 100 not in server.log() and len(server.log()) < 20_000


def test_user_text_stays_out_of_the_log(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    c.completions.create(model="tiny", prompt="zebra-prompt", max_tokens=2, stop=["zebra-stop-1"])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="zebra-prompt", stop=["zebra-stop-2"] * 5)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="zebra-model", prompt="x")
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", temperature="zebra-temperature")  # type: ignore[arg-type]
    time.sleep(0.2)
    assert "zebra" not in server.log()
    assert "invalid_value param=stop" in server.log()  # what failed is still logged


# ---------------------------------------------------------------------------------------------------------------
# Access: Host, Content-Type, API keys


def test_foreign_host_headers_are_refused(server):
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "10.1.2.3", f"127.0.0.1.evil.example:{port}"):
        for method, path in (("GET", "/"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
            r = httpx.request(method, server.url + path, json=BODY, headers={"Host": host})
            assert error_of(r, 400, None, "invalid_host")["message"].startswith("Host"), (host, path)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "proxy.example"):
        r = httpx.post(server.base_url + "/completions", json=BODY, headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    assert httpx.get(server.url + "/", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_post_bodies_must_be_json(server):
    body = httpx.Request("POST", "/", json=BODY).content
    for kind in ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", None):
        headers = {"content-type": kind} if kind else {}
        r = httpx.post(server.base_url + "/completions", content=body, headers=headers)
        assert "Content-Type" in error_of(r, 415, None, "unsupported_media_type")["message"], kind
    for kind in ("application/json; charset=utf-8", 'Application/JSON;charset="UTF-8"'):
        r = httpx.post(server.base_url + "/completions", content=body, headers={"content-type": kind})
        assert r.status_code == 200, (kind, r.text)


def _status(server, authorization: str | None) -> int:
    """A raw request: httpx refuses to send 'Bearer ' (a trailing space), a client could."""
    head = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1"
    return raw(server, head + (f"\r\nAuthorization: {authorization}" if authorization is not None else ""))[0]


def test_api_key_from_a_file_before_the_environment(tiny_dir, tmp_path):
    (tmp_path / "key").write_text("file-key\n")
    env = {"GPT2LOAD_API_KEY": "env-key"}
    with ServeProcess("--model", str(tiny_dir), "--api-key-file", str(tmp_path / "key"), env=env) as s:
        assert _status(s, "Bearer file-key") == 200
        for wrong in ("Bearer env-key", "Bearer", "Bearer ", "file-key", None):
            assert _status(s, wrong) == 401, wrong
        r = openai.OpenAI(base_url=s.base_url, api_key="file-key", max_retries=0).completions.create(
            model="tiny", prompt="x", max_tokens=1
        )
        assert r.usage.completion_tokens == 1
        assert "warning" not in s.log()


def test_api_key_from_the_environment_and_the_warning_beyond_loopback(tiny_dir):
    with ServeProcess("--model", str(tiny_dir), "--host", "0.0.0.0", env={"GPT2LOAD_API_KEY": "env-key"}) as s:
        assert _status(s, "Bearer env-key") == 200 and _status(s, "Bearer") == 401
        assert "warning" not in s.log()
    with ServeProcess("--model", str(tiny_dir), "--host", "0.0.0.0") as s:
        assert "warning: 0.0.0.0 is reachable beyond this machine and there is no API key" in s.log()
        # Bound to every interface: any address is a fine Host, a name still is not.
        assert httpx.get(s.url + "/v1/models", headers={"Host": "10.1.2.3"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Host": "evil.example"}).status_code == 400


def test_key_and_limit_errors_are_one_line(tiny_dir, tmp_path):
    model = ("serve", "--model", str(tiny_dir))
    assert_clean_error(run_cli(*model, "--api-key", ""), "--api-key is empty")
    assert_clean_error(run_cli(*model, env={"GPT2LOAD_API_KEY": ""}), "$GPT2LOAD_API_KEY is empty")
    (tmp_path / "empty").write_text("\n")
    assert_clean_error(run_cli(*model, "--api-key-file", str(tmp_path / "empty")), "is empty")
    assert_clean_error(run_cli(*model, "--api-key-file", str(tmp_path / "missing")), "cannot read", "missing")
    assert_clean_error(run_cli(*model, "--api-key", "a b"), "spaces")
    assert_clean_error(run_cli(*model, "--api-key", "k", "--api-key-file", "f"), "not both")
    assert_clean_error(run_cli(*model, "--max-body-bytes", "0"), "--max-body-bytes must be >= 1")
    assert_clean_error(run_cli(*model, "--max-queued-choices", "64", "--max-choices", "65"), "never fit")
    assert "GPT2LOAD_API_KEY" in run_cli("serve", "--help").stdout


# ---------------------------------------------------------------------------------------------------------------
# A client that gives up: its work stops at once, streamed or not

SLOW = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=256, n_heads=4, n_layers=8)  # ~8 s per 1000 tokens


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    folder = make_model(tmp_path_factory.mktemp("hostile") / "slow", SLOW)
    with ServeProcess("--model", str(folder), "--max-batch-size", "1", "--max-queued-choices", "128") as s:
        yield s


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_client_that_leaves_cancels_its_work(slow_server, stream):
    s = slow_server
    # 20 choices of 60 tokens, one row: an event (a choice's end) about every half second, 10 s in all.
    job = {"model": "slow", "prompt": "Go", "max_tokens": 60, "n": 20, "stream": stream}
    body = httpx.Request("POST", "/", json=job)
    port = int(s.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body.content)}\r\n\r\n".encode() + body.content)
    sent = time.monotonic()
    deadline = time.monotonic() + 60
    while httpx.get(s.url + "/health").json()["active"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Leave 1.15 s after sending: a server that only looked for disconnects every idle second (as this one did)
    # would notice ~0.85 s later; the answer's choices all end together, so no event comes before.
    time.sleep(max(0.0, sent + 1.15 - time.monotonic()))
    before = len([ln for ln in s.lines if "status=499" in ln])
    sock.close()
    left = time.monotonic()
    while (health := httpx.get(s.url + "/health").json())["active"] + health["queued"] > 0:
        assert time.monotonic() - left < 30
        time.sleep(0.02)
    freed = time.monotonic() - left
    time.sleep(0.2)
    [gone] = [ln for ln in s.lines if "status=499" in ln][before:]
    done = int(gone.split("completion_tokens=")[1].split()[0])
    assert done < 20 * 60, gone  # it did not run to the end
    assert freed < 0.5, freed  # the row and the queue freed at once (the whole answer would take seconds more)
