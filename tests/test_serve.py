"""`gpt2load serve` as users meet it: a real server in a subprocess, the official `openai` client and raw HTTP."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import assert_clean_error, run_cli
from serveserver import ServeProcess, make_model

from gpt2load import GPTConfig, complete
from gpt2load.generation.templates import format_instruction
from gpt2load.load import load_gpt2, load_tokenizer
from gpt2load.tokenizer import encode

TINY = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("serve") / "tiny", TINY)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServeProcess("--model", str(tiny_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_gpt2(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def enc(tiny_dir):
    return load_tokenizer(tiny_dir)


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def greedy(model, enc, prompt: str, n: int, **kw) -> dict:
    return complete(model, enc, prompt, max_new_tokens=n, **kw)["completions"][0]


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_greedy_equals_generate_stream_and_not(server, model, enc):
    want = greedy(model, enc, PROMPT, 12)
    r = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    [choice] = r.choices
    assert choice.text == want["text"]
    assert r.usage.prompt_tokens == len(encode(enc, PROMPT))
    assert r.usage.completion_tokens == len(want["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("length" if len(want["token_ids"]) == 12 else "stop")
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "tiny"
    greedy_12 = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    chunks = list(client(server).completions.create(stream=True, **greedy_12))
    assert "".join(c.choices[0].text for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len(chunks) > 2  # streamed piece by piece, not in one go
    with_usage = list(
        client(server).completions.create(stream=True, stream_options={"include_usage": True}, **greedy_12)
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == r.usage.completion_tokens


def test_seeded_sampling_is_reproducible_and_matches_generate(server, model, enc):
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.5, "extra_body": {"top_k": 50}}
    first = client(server).completions.create(n=2, seed=7, **kw)
    again = client(server).completions.create(n=2, seed=7, **kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1]
    # Choice 0 draws from the same random stream as `gpt2load generate --seed 7`.
    want = greedy(model, enc, PROMPT, 10, temperature=1.5, top_k=50, seed=7)
    assert first.choices[0].text == want["text"]


def test_stop_string_cuts_the_text(server, model, enc):
    text = greedy(model, enc, PROMPT, 20)["text"]
    k = len(text) // 2
    stop = text[k : k + 3]
    want = text[: text.find(stop)]
    c = client(server)
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "never seen"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": stop}
    chunks = list(c.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models(server, model, enc):
    r = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    ids = encode(enc, PROMPT) + encode(enc, r.choices[0].text)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    P = len(encode(enc, PROMPT))
    for i, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert value == pytest.approx(float(ref[P - 1 + i, ids[P + i]]), abs=1e-4)
        assert len(top) == 3 and max(top.values()) == pytest.approx(value)  # greedy: the best of the top 3


def test_echo_with_logprobs(server, model, enc):
    r = client(server).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    c = r.choices[0]
    tail = greedy(model, enc, PROMPT, 3)["text"]
    assert c.text == PROMPT + tail
    ids = encode(enc, PROMPT)
    assert len(c.logprobs.tokens) == len(ids) + 3
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.text_offset[:2] == [0, len(enc.decode(ids[:1]))]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    assert c.logprobs.token_logprobs[1] == pytest.approx(float(ref[0, ids[1]]), abs=1e-4)
    zero = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True)
    assert zero.choices[0].text == PROMPT and zero.usage.completion_tokens == 0


def test_prompt_forms_and_choice_indices(server, model, enc):
    c = client(server)
    ids = encode(enc, PROMPT)
    want = greedy(model, enc, PROMPT, 4)["text"]
    assert c.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0).choices[0].text == want
    r = c.completions.create(model="tiny", prompt=[PROMPT, "Hello"], max_tokens=4, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == want
    assert r.choices[2].text == greedy(model, enc, "Hello", 4)["text"]
    r = c.completions.create(model="tiny", prompt=[ids, encode(enc, "Hello")], max_tokens=4, temperature=0)
    assert [ch.text for ch in r.choices] == [want, greedy(model, enc, "Hello", 4)["text"]]
    assert r.usage.prompt_tokens == len(ids) + len(encode(enc, "Hello"))


def test_beam_search_equals_generate(server, model, enc):
    want = complete(model, enc, PROMPT, max_new_tokens=6, num_beams=3, num_return_sequences=2)["completions"]
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "n": 2, "extra_body": {"num_beams": 3}}
    r = client(server).completions.create(**kw)
    assert [c.text for c in r.choices] == [w["text"] for w in want]
    chunks = list(client(server).completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == 0) == want[0]["text"]


def test_eight_clients_at_once_get_their_single_client_answers(server):
    prompts = [PROMPT, "Hello", "The cat sat on the", "1, 2, 3,", "A", "Once upon a time", "Why?", "x = 1\ny ="]
    c = client(server)

    def ask(p: str) -> str:
        return c.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def worker(i: int) -> None:
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert httpx.get(server.url + "/health").json()["peak_batch"] >= 2  # they really were decoded together


BAD = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"top_k": 0}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 2, "temperature": 0.7}, "temperature"),
    ({"num_beams": 2, "n": 3}, "n"),
    ({"num_beams": 2, "logprobs": 1}, "logprobs"),
    ({"min_tokens": 100}, "min_tokens"),
    ({"length_penalty": "long"}, "length_penalty"),
    ({"prompt": [50257]}, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": list(range(65))}, "prompt"),
    ({"echo": "yes"}, "echo"),
    ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"suffix": "!"}, "suffix"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"user": 5}, "user"),
    ({"model": None}, "model"),
]


@pytest.mark.parametrize(("change", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_parameters_are_400_naming_them(server, change, param):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **change}
    r = httpx.post(server.base_url + "/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert param in err["message"] or err["code"] == "context_length_exceeded"
    assert set(err) == {"message", "type", "param", "code"}


def test_bad_requests_never_break_the_server(server):
    json_type = {"content-type": "application/json"}
    post = lambda body: httpx.post(server.base_url + "/completions", content=body, headers=json_type)  # noqa: E731
    r = post(b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert post(b"[1, 2]").status_code == 400
    assert post(b"\xff\xfe").status_code == 400
    r = httpx.post(server.base_url + "/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.base_url + "/models/gpt-4").status_code == 404
    r = httpx.get(server.url + "/v2/anything")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Unknown request URL")
    assert httpx.get(server.base_url + "/completions").status_code == 405
    r = httpx.post(server.base_url + "/chat/completions", json={"model": "tiny", "messages": [{"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_prompt_template"  # a plain language model
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model="tiny", prompt="x", temperature=9)
    assert client(server).completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_one_log_line_per_request_without_prompt_text(server):
    secret = "zebra-violet-quartz"
    client(server).completions.create(model="tiny", prompt=secret, max_tokens=3, temperature=0)
    time.sleep(0.2)
    lines = [ln for ln in server.lines if "/v1/completions status=200" in ln]
    assert lines and all("prompt_tokens=" in ln and "completion_tokens=" in ln and "time=" in ln for ln in lines)
    assert secret not in server.log()


# ---------------------------------------------------------------------------------------------------------------
# An instruction model (prompt template, EOS first), with an API key, prompt logging and a token limit


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("serve") / "instruct", TINY, seed=1, eos_first=True, template="alpaca")


@pytest.fixture(scope="module")
def chat_server(chat_dir):
    args = ("--model", str(chat_dir), "--api-key", "sekrit", "--log-prompts", "--max-tokens-limit", "20")
    with ServeProcess(*args) as s:
        yield s


def test_chat_with_the_template_stream_and_not(chat_server, chat_dir):
    model, enc = load_gpt2(chat_dir, device="cpu"), load_tokenizer(chat_dir)
    want = complete(model, enc, format_instruction("Say hi"), max_new_tokens=20, min_new_tokens=3)["completions"][0]
    assert len(want["token_ids"]) == 3  # EOS as soon as it is allowed
    c = client(chat_server, "sekrit")
    messages = [{"role": "user", "content": "Earlier turn"}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "Say hi"})
    r = c.chat.completions.create(model="instruct", messages=messages, temperature=0, extra_body={"min_tokens": 3})
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert choice.finish_reason == "stop" and r.usage.completion_tokens == 3 and r.object == "chat.completion"
    chunks = list(
        c.chat.completions.create(
            model="instruct", messages=messages, temperature=0, stream=True, extra_body={"min_tokens": 3}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "Say hi" in chat_server.log()  # --log-prompts
    r = c.chat.completions.create(
        model="instruct", messages=messages, temperature=0, logprobs=True, top_logprobs=2, extra_body={"min_tokens": 3}
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content and len(content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes for t in content)


def test_chat_refuses_system_messages_and_limits(chat_server):
    c = client(chat_server, "sekrit")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="instruct", messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "x"}]
        )
    assert e.value.body["param"] == "messages[0]" and "system" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="instruct", messages=[{"role": "user", "content": "x"}], max_tokens=30)
    assert e.value.body["param"] == "max_tokens"
    r = c.completions.create(model="instruct", prompt="x", temperature=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"  # EOS at once


def test_api_key(chat_server):
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            client(chat_server, key or "-").models.list()
    r = httpx.post(chat_server.base_url + "/completions", json={"model": "instruct", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(chat_server.url + "/health").status_code == 200  # health and the page need no key
    assert httpx.get(chat_server.url + "/").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# A slow model, one row, a queue of one: disconnects free the row, a full queue answers 503

SLOW = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=128, n_heads=4, n_layers=4)


def test_queue_full_and_disconnect_frees_the_slot(tmp_path):
    folder = make_model(tmp_path / "slow", SLOW)
    with ServeProcess("--model", str(folder), "--max-batch-size", "1", "--max-queue", "1") as server:
        long = {"model": "slow", "prompt": "Go", "max_tokens": 1000, "temperature": 0}
        with httpx.stream("POST", server.base_url + "/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the first chunk: it holds the only row now
            queued: dict = {}
            short = {**long, "max_tokens": 3}
            waiter = threading.Thread(
                target=lambda: queued.update(r=httpx.post(server.base_url + "/completions", json=short, timeout=120))
            )
            waiter.start()
            deadline = time.monotonic() + 60
            while httpx.get(server.url + "/health").json()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            full = httpx.post(server.base_url + "/completions", json=short)
            assert full.status_code == 503 and full.headers["retry-after"]
            assert full.json()["error"]["code"] == "queue_full"
        # The stream is closed: its row frees and the queued request runs.
        waiter.join(120)
        assert queued["r"].status_code == 200 and queued["r"].json()["usage"]["completion_tokens"] == 3
        time.sleep(0.3)
        [gone] = [ln for ln in server.lines if "status=499" in ln]
        assert int(gone.split("completion_tokens=")[1].split()[0]) < 1000
        assert httpx.get(server.url + "/health").json()["active"] == 0


def test_command_line_errors_are_one_line(tiny_dir):
    assert "--max-batch-size" in run_cli("serve", "--help").stdout
    assert_clean_error(run_cli("serve", "--model", str(tiny_dir / "missing")), "does not exist")
    assert_clean_error(run_cli("serve", "--model", str(tiny_dir), "--max-batch-size", "0"), "--max-batch-size")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_clean_error(run_cli("serve", "--model", str(tiny_dir), "--port", port), "cannot listen", port)


def test_quantized_server_equals_the_int8_model(tiny_dir, enc):
    """`serve --quantize int8` decodes what load_gpt2(quantize="int8") decodes."""
    want = greedy(load_gpt2(tiny_dir, device="cpu", quantize="int8"), enc, PROMPT, 8)
    with ServeProcess("--model", str(tiny_dir), "--quantize", "int8") as s:
        r = client(s).completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == want["text"]
