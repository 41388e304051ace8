"""The HTTP API (OpenAI's completions and chat completions, models, health) and the page, as a FastAPI app."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources

import tiktoken
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .batcher import Batcher, QueueFull
from .guard import HostCheck, HostRule, check_content_type, parse_body, read_body
from .protocol import APIError, Limits, chat_job, clip, completion_job
from .responses import Answer
from .sequence import Failure, Finish, Piece
from .sequence import Request as Work

log = logging.getLogger("gpt2load.serve")


@dataclass
class ServerState:
    """What the routes share: the model's limits and tokenizer, the batcher once the model is loaded."""

    limits: Limits
    enc: tiktoken.Encoding
    api_key: str | None = None
    log_prompts: bool = False
    batcher: Batcher | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    hosts: HostRule = field(default_factory=lambda: HostRule("127.0.0.1"))
    created: int = field(default_factory=lambda: int(time.time()))


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state`'s model."""
    app = FastAPI(title="gpt2load", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        HostCheck, rule=state.hosts, log=lambda path, status, error: _log_line(path, status, error=error)
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        _log_line(request.url.path, e.status, error=_error_note(e, state.log_prompts))
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        text = f"Unknown request URL: {request.method} {clip(request.url.path)}." if e.status_code == 404 else e.detail
        return await api_error(request, APIError(e.status_code, str(text), code="unknown_url"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.batcher is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        if not state.batcher.alive:  # requests would wait forever: a supervisor should restart the server
            error = "the decoding thread has stopped: restart the server"
            body = {"status": "error", "model": state.limits.model_id, "error": error, **state.batcher.stats()}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "model": state.limits.model_id, **state.batcher.stats()})

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("gpt2load.serve").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _authorize(request, state)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        _authorize(request, state)
        if model_id != state.limits.model_id:
            raise APIError(404, f"The model {clip(model_id)} does not exist.", "model", "model_not_found")
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, state, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(request, state, chat=True)

    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.limits.model_id, "object": "model", "created": state.created, "owned_by": "gpt2load"}


def _authorize(request: Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if (
        scheme.lower() != "bearer"
        or not key.strip()
        or not hmac.compare_digest(key.strip().encode(), state.api_key.encode())
    ):
        what = "Incorrect API key provided." if given else "You didn't provide an API key."
        raise APIError(
            401, f"{what} Send it as 'Authorization: Bearer KEY' (the server's API key).", code="invalid_api_key"
        )


async def _generate(request: Request, state: ServerState, chat: bool) -> Response:
    """Check the request, queue it, and answer with one JSON object or a stream of server-sent events."""
    start = time.monotonic()
    _authorize(request, state)
    if state.batcher is None:
        raise APIError(
            503, "The model is still loading: retry shortly.", kind="server_error", headers={"Retry-After": "5"}
        )
    check_content_type(request)
    body = parse_body(await read_body(request, state.max_body_bytes))
    job = (chat_job if chat else completion_job)(body, state.enc, state.limits)
    answer = Answer(
        ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], chat, state.limits.model_id, state.enc, job
    )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(event: object) -> None:  # called by the batcher's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the server is shutting down: nobody is waiting any more
            work.cancel()

    work = Work(job.prompts, job.n, job.params, deliver, job.stream)
    try:
        state.batcher.submit(work)
    except QueueFull as e:
        if not state.batcher.alive:  # stopped for good: the server is exiting so that it can be restarted
            raise APIError(503, f"The server cannot take requests: {e}.", kind="server_error") from None
        raise APIError(
            503,
            f"The server is busy ({e}): retry shortly.",
            code="queue_full",
            kind="server_error",
            headers={"Retry-After": "1"},
        ) from None
    prompt_text = body.get("prompt", body.get("messages")) if state.log_prompts else None
    if job.stream:
        chunks = _stream(request, answer, work, queue, start, prompt_text)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await _collect_unless_gone(request, answer, _events(work, queue, answer.total))
    except ClientGone:
        _log_line(request.url.path, 499, answer, start, prompt_text, error="client disconnected")
        return Response(status_code=499)
    _log_line(request.url.path, 200, answer, start, prompt_text)
    return JSONResponse(answer.response())


async def _collect_unless_gone(request: Request, answer: Answer, events: AsyncIterator[object]) -> None:
    """Add `events` to `answer`; if the client disconnects first, stop (which cancels the work) and raise ClientGone.

    The body has been read, so the next ASGI message is `http.disconnect`: it arrives when the client closes, or
    when the response is complete (never before ours, here)."""

    async def collect() -> None:
        async for event in events:
            answer.add(event)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # its generator's `finally` cancels the batcher's work
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientGone
    work.result()  # an APIError from a failed generation


async def _events(work: Work, queue: asyncio.Queue, total: int) -> AsyncIterator[object]:
    """The batcher's events for `work` until every choice has finished; closing it early cancels the work."""
    left = total
    try:
        while left:
            event = await queue.get()
            if isinstance(event, Failure):
                raise APIError(500, f"generation failed: {event.message}", kind="server_error")
            left -= isinstance(event, Finish)
            yield event
    finally:
        if left:
            work.cancel()  # the client left, or failed: its sequences free their rows at the next step


async def _stream(
    request: Request, answer: Answer, work: Work, queue: asyncio.Queue, start: float, prompt_text
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new piece of text or finished choice, then `data: [DONE]`."""
    status, error = 200, None
    try:
        yield from_chunk(answer.first_chunk())
        # In a stream, the response machinery notices a disconnect and cancels this generator (the `finally`).
        async for event in _events(work, queue, answer.total):
            answer.add(event)
            if isinstance(event, (Piece, Finish)):
                yield from_chunk(answer.chunk(event))
        if answer.job.include_usage:
            yield from_chunk(answer.usage_chunk())
        yield "data: [DONE]\n\n"
    except APIError as e:
        status, error = e.status, e.message
        yield from_chunk(e.body())
    except BaseException:
        status, error = 499, "client disconnected"
        raise
    finally:
        _log_line(request.url.path, status, answer, start, prompt_text, error=error)


def _error_note(e: APIError, log_prompts: bool) -> str:
    """What the log says of an error: a client error's message may quote the request (stop strings, a model name),
    so without --log-prompts only its code and field are logged."""
    if e.status >= 500 or log_prompts:
        return e.message
    return (e.code or e.kind) + (f" param={e.param}" if e.param else "")


def from_chunk(data: dict | None) -> str:
    return "" if data is None else f"data: {json.dumps(data)}\n\n"


def _log_line(path, status, answer=None, start=None, prompt_text=None, error=None) -> None:
    """One line per request: id, endpoint, status, tokens, time, finish reasons; the prompt only if asked."""
    parts = [f"id={answer.id if answer else '-'}", clip(path, 80)[1:-1], f"status={status}"]
    if answer is not None:
        u = answer.usage()
        parts += [f"prompt_tokens={u['prompt_tokens']}", f"completion_tokens={u['completion_tokens']}"]
        parts.append(f"finish={','.join(r or '-' for r in answer.finish)}")
    if start is not None:
        parts.append(f"time={time.monotonic() - start:.3f}s")
    if error:
        parts.append(f"error={json.dumps(error)}")
    if prompt_text is not None:
        parts.append(f"prompt={json.dumps(prompt_text)}")
    log.info(" ".join(parts))
