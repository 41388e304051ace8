"""The OpenAI API's request bodies, checked field by field: every invalid value is a 400 that names the field.

Null means "the default", as in OpenAI's API. Unknown fields are ignored (clients send more than any one server
supports), except those that would change the answer and are not supported here (`suffix`, `logit_bias`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tiktoken

from ..generation.templates import format_instruction
from ..tokenizer import encode
from .sequence import SamplingParams

MAX_LOGPROBS = 20
MAX_N = 128
CLIP = 40  # characters of a user's value quoted in an error message
# Fields that would change the answer but are not implemented: refused rather than silently ignored.
UNSUPPORTED = ("suffix", "logit_bias", "tools", "functions", "response_format", "tool_choice", "function_call")
# With num_beams > 1 decoding is deterministic: these must keep their neutral value.
BEAM_NEUTRAL = {
    "temperature": (0, None),
    "top_p": (1, None),
    "top_k": (None,),
    "repetition_penalty": (1, None),
    "presence_penalty": (0, None),
    "frequency_penalty": (0, None),
    "min_tokens": (0, None),
    "logprobs": (None, False),
    "seed": (None,),
}


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def clip(value: object, limit: int = CLIP) -> str:
    """`value`'s repr, cut to `limit` characters: error messages and logs never echo a whole user value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def invalid(param: str, message: str) -> APIError:
    return APIError(400, f"Invalid value for '{param}': {message}", param, "invalid_value")


@dataclass
class Limits:
    """What the served model and the command line allow."""

    model_id: str
    vocab_size: int
    context_length: int
    max_tokens_limit: int | None = None
    template: str | None = None
    max_choices: int = 128  # prompts x max(n, num_beams) in one request
    max_logprob_entries: int = 131_072  # tokens x (logprobs + 1) x choices in one answer


@dataclass
class Job:
    """A checked request: token-id prompts, choices per prompt, decoding settings, how to answer."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default: float | None, lo: float, hi: float, open_lo: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"expected a number, got {clip(value)}")
    if value < lo or value > hi or (open_lo and value == lo):
        raise invalid(name, f"must be {'>' if open_lo else '>='} {lo} and <= {hi}, got {clip(value)}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"expected a whole number, got {clip(value)}")
    if value < lo or (hi is not None and value > hi):
        raise invalid(name, f"must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {clip(value)}")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"expected true or false, got {clip(value)}")
    return value


def _check_model(body: dict, limits: Limits) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "You must provide a model parameter (see GET /v1/models).", "model", "missing_required")
    if model != limits.model_id:
        raise APIError(
            404,
            f"The model {clip(model)} does not exist; this server serves '{limits.model_id}'.",
            "model",
            "model_not_found",
        )


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or (stop is not None and not 0 < len(stops) <= 4):
        raise invalid("stop", f"expected a string or a list of up to 4 strings, got {clip(stop)}")
    if any(not isinstance(s, str) or not s for s in stops):
        raise invalid("stop", f"stop strings must be non-empty strings, got {clip(stop)}")
    return stops


def prompt_ids(prompt: object, enc: tiktoken.Encoding, vocab: int, max_prompts: int = MAX_N) -> list[list[int]]:
    """The `prompt` field's forms (text, texts, token ids, lists of token ids) as token-id lists; more than
    `max_prompts` prompts are refused before any is encoded."""

    def ids(p: object) -> list[int]:
        if isinstance(p, str):
            return encode(enc, p) or [enc.eot_token]  # GPT-2 saw <|endoftext|> between documents
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise invalid("prompt", f"token id {bad[0]} is outside the model's vocabulary of {vocab} tokens")
            return p
        raise invalid("prompt", "expected a string, a list of strings, a list of token ids or a list of such lists")

    if prompt is None:
        return [[enc.eot_token]]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > max_prompts:
            raise APIError(
                400,
                f"{len(prompt)} prompts in one request, but this server allows {max_prompts} choices per request "
                "(--max-choices): send fewer prompts.",
                "prompt",
                "too_many_choices",
            )
        return [ids(p) for p in prompt]
    return [ids(prompt)]


def _lengths(body: dict, prompts: list[list[int]], default: int | None, limits: Limits, param: str) -> tuple[int, int]:
    """(max_tokens, min_tokens), checked against the context window and --max-tokens-limit."""
    ctx, cap = limits.context_length, limits.max_tokens_limit
    longest = max(len(p) for p in prompts)
    if longest > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens, but the prompt has {longest}: shorten it.",
            param,
            "context_length_exceeded",
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = ctx - longest
    max_tokens = _integer(body, name, None, 0, cap)
    if max_tokens is None:
        max_tokens = min(room if default is None else default, room, cap if cap is not None else room)
    elif max_tokens > room:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens, but you asked for {longest + max_tokens} "
            f"({longest} in the prompt, {max_tokens} for the completion): reduce the prompt or {name}.",
            name,
            "context_length_exceeded",
        )
    min_tokens = _integer(body, "min_tokens", 0, 0, max_tokens)
    return max_tokens, min_tokens


def _settings(body: dict, prompts: list[list[int]], default_max: int | None, limits: Limits, param: str) -> Job:
    """The fields completions and chat share."""
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid("user", f"expected a string, got {clip(body['user'])}")
    max_tokens, min_tokens = _lengths(body, prompts, default_max, limits, param)
    n = _integer(body, "n", 1, 1, MAX_N)
    num_beams = _integer(body, "num_beams", 1, 1, 64)
    if num_beams > 1:
        for name, neutral in BEAM_NEUTRAL.items():
            if body.get(name) not in neutral:
                raise invalid(name, "cannot be combined with beam search (num_beams > 1), which is deterministic")
        if n > num_beams:
            raise invalid("n", f"with beam search, n must be <= num_beams ({num_beams}), got {n}")
    rows = len(prompts) * max(n, num_beams)  # beam search holds num_beams rows per prompt
    if rows > limits.max_choices:
        name = "num_beams" if num_beams > n else "n"
        raise APIError(
            400,
            f"{len(prompts)} prompt(s) x {name}={max(n, num_beams)} is {rows} choices, but this server allows "
            f"{limits.max_choices} per request (--max-choices): lower {name} or send fewer prompts.",
            name,
            "too_many_choices",
        )
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(
            400, "'best_of' other than n is not supported by this server.", "best_of", "unsupported_parameter"
        )
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise invalid("stream_options", "only allowed with stream: true, as an object like {'include_usage': true}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise invalid("seed", f"expected a whole number, got {clip(seed)}")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0 if num_beams > 1 else 1.0, 0, 2),
        top_p=_number(body, "top_p", None, 0, 1, open_lo=True),
        top_k=_integer(body, "top_k", None, 1),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 100, open_lo=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        min_tokens=min_tokens,
        stop=_stop(body),
        seed=seed,
        num_beams=num_beams,
        length_penalty=_number(body, "length_penalty", 1.0, -100, 100),
    )
    include_usage = _boolean(options, "include_usage") if options else False
    return Job(prompts, n, params, stream, include_usage)


def completion_job(body: dict, enc: tiktoken.Encoding, limits: Limits) -> Job:
    """A checked `POST /v1/completions` body."""
    _check_model(body, limits)
    prompts = prompt_ids(body.get("prompt"), enc, limits.vocab_size, limits.max_choices)
    job = _settings(body, prompts, 16, limits, "prompt")  # OpenAI's default max_tokens for completions: 16
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    if logprobs is not None and job.params.num_beams > 1:
        raise invalid("logprobs", "cannot be combined with beam search (num_beams > 1)")
    job.params.logprobs = logprobs
    job.params.echo = _boolean(body, "echo")
    _check_logprob_entries(job, limits, "logprobs")
    return job


def _check_logprob_entries(job: Job, limits: Limits, param: str) -> None:
    """Refuse an answer whose log-probabilities would outgrow --max-logprob-entries, before it is queued: each
    token of each choice (the echoed prompt's too) carries its own log-probability and `logprobs` alternatives."""
    p = job.params
    if p.logprobs is None:
        return
    tokens = sum((len(prompt) if p.echo else 0) + p.max_tokens for prompt in job.prompts) * job.n
    entries = tokens * (p.logprobs + 1)
    if entries > limits.max_logprob_entries:
        raise APIError(
            400,
            f"This answer could hold {entries} log-probabilities ({tokens} tokens x {p.logprobs + 1}), but this "
            f"server allows {limits.max_logprob_entries} (--max-logprob-entries): lower {param}, n or max_tokens"
            + (", or drop echo." if p.echo else "."),
            param,
            "too_many_logprobs",
        )


def chat_prompt(messages: object, template: str | None, model_id: str) -> str:
    """The prompt text for `messages` in the model's template: the last user message is the instruction."""
    if template is None:
        raise APIError(
            400,
            f"The model '{model_id}' has no prompt template (it is not instruction fine-tuned), so it cannot chat: "
            "use /v1/completions with plain text.",
            "model",
            "no_prompt_template",
        )
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty list of {role, content} objects")
    texts = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(parts) if len(parts) == len(content) and all(isinstance(p, str) for p in parts) else None
        if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
            raise invalid(f"messages[{i}]", "expected {'role': 'user'|'assistant'|'system', 'content': text}")
        if role in ("system", "developer"):
            raise invalid(
                f"messages[{i}]",
                f"the model's {template} prompt template has no place for a {role} message: "
                "put the instruction in the last user message",
            )
        texts.append((role, content))
    if texts[-1][0] != "user":
        raise invalid("messages", "the last message must be the user's instruction")
    return format_instruction(texts[-1][1])


def chat_job(body: dict, enc: tiktoken.Encoding, limits: Limits) -> Job:
    """A checked `POST /v1/chat/completions` body."""
    _check_model(body, limits)
    text = chat_prompt(body.get("messages"), limits.template, limits.model_id)
    job = _settings(body, [encode(enc, text)], None, limits, "messages")
    if _boolean(body, "logprobs"):
        if job.params.num_beams > 1:
            raise invalid("logprobs", "cannot be combined with beam search (num_beams > 1)")
        job.params.logprobs = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        _check_logprob_entries(job, limits, "top_logprobs")
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "requires logprobs: true")
    return job
