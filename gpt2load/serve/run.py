"""`gpt2load serve`: check the model folder, listen, load the model in the background, run uvicorn."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path

import uvicorn

from ..errors import Gpt2LoadError
from ..formats import stfile
from ..formats.layouts import open_source
from ..generation.templates import TEMPLATES
from ..load import load_gpt2, model_folder
from ..settings import Settings
from ..tokenizer import tokenizer_from_folder
from .app import ServerState, create_app
from .batcher import Batcher
from .guard import HostRule
from .protocol import Limits

log = logging.getLogger("gpt2load.serve")


def read_prompt_template(where: Path) -> str | None:
    """The prompt template a model records (`prompt_template` in its folder's config.json or in a gpt2load
    safetensors file's metadata), or None for a plain language model."""
    value = None
    if where.is_dir() and (where / "config.json").is_file():
        try:
            raw = json.loads((where / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Gpt2LoadError(f"{where / 'config.json'} is not valid JSON: fix or replace it") from None
        value = raw.get("prompt_template") if isinstance(raw, dict) else None
    weights = where if where.suffix == ".safetensors" else where / "model.safetensors"
    if value is None and weights.is_file():
        value = stfile.read_header(weights)[1].get("prompt_template")
    if value is not None and value not in TEMPLATES:
        raise Gpt2LoadError(
            f"{where} records prompt_template {value!r}, which gpt2load does not know (known: {', '.join(TEMPLATES)})"
        )
    return value


KEY_VARIABLE = "GPT2LOAD_API_KEY"


def _check_flags(port: int, max_tokens_limit: int | None, **at_least_one: int | None) -> None:
    for name, value, low in (
        *((f"--{k.replace('_', '-')}", v, 1) for k, v in at_least_one.items() if v is not None),
        ("--port", port, 0),
    ):
        if value < low:
            raise Gpt2LoadError(f"{name} must be >= {low}, got {value}")
    if port > 65535:
        raise Gpt2LoadError(f"--port must be <= 65535, got {port}")
    choices, queued = at_least_one.get("max_choices"), at_least_one.get("max_queued_choices")
    if choices is not None and queued is not None and queued < choices:
        raise Gpt2LoadError(
            f"--max-queued-choices ({queued}) must be >= --max-choices ({choices}): a request of "
            f"{choices} choices would never fit in the queue"
        )
    if max_tokens_limit is not None and max_tokens_limit < 1:
        raise Gpt2LoadError(f"--max-tokens-limit must be >= 1, got {max_tokens_limit}")


def resolve_api_key(api_key: str | None, api_key_file: str | None, environ: dict[str, str]) -> str | None:
    """The key from --api-key, else --api-key-file, else $GPT2LOAD_API_KEY; None when none is given. An empty key
    (which a bare 'Bearer' would match) or one an HTTP header cannot carry is refused, naming where it came from."""
    if api_key is not None and api_key_file is not None:
        raise Gpt2LoadError("give the API key once: --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            key, where = Path(api_key_file).read_text(encoding="utf-8").strip(), f"--api-key-file {api_key_file}"
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not UTF-8 text"
            raise Gpt2LoadError(f"cannot read the API key from {api_key_file} ({reason}): fix --api-key-file") from None
    elif api_key is not None:
        key, where = api_key, "--api-key"
    elif KEY_VARIABLE in environ:
        key, where = environ[KEY_VARIABLE], f"${KEY_VARIABLE}"
    else:
        return None
    if not key:
        raise Gpt2LoadError(f"the API key from {where} is empty: give a key, or none to serve without one")
    if not all(33 <= ord(c) < 127 for c in key):
        raise Gpt2LoadError(f"the API key from {where} has spaces or non-ASCII characters: a header cannot carry it")
    return key


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading, so a taken port is a one-line error right away."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Gpt2LoadError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --host/--port"
        ) from None
    return sock


def serve(
    model: str = "124M",
    source: str = "hf",
    weights_dir: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_file: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    device: str | None = None,
    dtype: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_tokens_limit: int | None = None,
    log_prompts: bool = False,
    quantize: str | None = None,
    max_body_bytes: int = 2 * 1024 * 1024,
    max_choices: int = 128,
    max_queued_choices: int | None = None,
    max_logprob_entries: int = 131_072,
    n_heads: int | None = None,
) -> None:
    """Serve a model over HTTP with OpenAI's API and a page at `/`, until interrupted.

    Args:
        model: a size or alias, or a local model folder/file (as `load_gpt2`).
        api_key: when set, /v1 requests must send `Authorization: Bearer KEY` (on a command line, other local
            users can read it: prefer api_key_file or $GPT2LOAD_API_KEY, read when neither is given).
        api_key_file: a file holding the key.
        allowed_hosts: Host names answered besides loopback names and the bound address ("*": any).
        max_batch_size: sequences decoded together in one step.
        max_queue: requests that may wait for a free row; past that, 503 with Retry-After.
        max_tokens_limit: the most tokens one completion may ask for (default: the context window).
        log_prompts: also log prompt text and client errors' messages (which may quote the request).
        max_body_bytes: the largest request body; larger ones are refused (413) before they are read whole.
        max_choices: prompts x n (or num_beams) one request may ask for.
        max_queued_choices: choices that may wait for a row, across requests (default: the batcher's).
        max_logprob_entries: tokens x (logprobs + 1) x choices one answer may hold.
        quantize: "int8" for int8 weight-only Linear layers and head (as `load_gpt2`).
        n_heads: as for load_gpt2 (a book-layout .pth of a width no GPT-2 size has).
    """
    _check_flags(
        port,
        max_tokens_limit,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_choices=max_choices,
        max_queued_choices=max_queued_choices,
        max_logprob_entries=max_logprob_entries,
    )
    settings = Settings.from_env()  # once, for the key, the download and the model's kernels
    api_key = resolve_api_key(api_key, api_key_file, dict(settings.env))
    if not log.handlers:  # our own logger only: one line per request on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s gpt2load serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    where = model_folder(model, source, weights_dir, settings=settings)
    src = open_source(where, n_heads)  # an unknown or broken folder fails now, with its one-line error
    enc = tokenizer_from_folder(where if where.is_dir() else where.parent)
    model_id = where.resolve().name if os.path.exists(str(model)) else str(model)
    template = read_prompt_template(where)
    limits = Limits(
        model_id,
        src.cfg.vocab_size,
        src.cfg.context_length,
        max_tokens_limit,
        template,
        max_choices,
        max_logprob_entries,
    )
    sock = _listen(host, port)
    state = ServerState(limits, enc, api_key, log_prompts, max_body_bytes=max_body_bytes)
    state.hosts = HostRule(host, allowed_hosts)
    queue_limits = {"max_queue": max_queue}
    if max_queued_choices is not None:
        queue_limits["max_queued_choices"] = max_queued_choices
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", access_log=False))
    failure: list[BaseException] = []

    def fatal(e: BaseException) -> None:
        """The decoding thread died twice within a minute: stop, so that a supervisor restarts the server."""
        why = f"{type(e).__name__}: {e}"[:200]
        failure.append(Gpt2LoadError(f"the decoding thread stopped twice within a minute ({why}): restart the server"))
        server.should_exit = True

    def load() -> None:
        try:
            gpt = load_gpt2(
                where, device=device, dtype=dtype, quiet=True, quantize=quantize, settings=settings, n_heads=n_heads
            )
            state.batcher = Batcher(gpt, enc, max_batch_size, **queue_limits, on_fatal=fatal)
            log.info(f"ready: {model_id} ({src.cfg.n_params / 1e6:.0f}M parameters), batches of {max_batch_size}")
        except BaseException as e:  # the server stops and the error is reported as the command's own
            failure.append(e)
            server.should_exit = True

    bound = sock.getsockname()
    log.info(f"listening on http://{host}:{bound[1]} (model {model_id} loading)")
    if api_key is None and not _is_loopback(host):
        log.warning(
            f"warning: {host} is reachable beyond this machine and there is no API key: anyone who can reach it "
            f"can use the model (set ${KEY_VARIABLE} or --api-key-file)"
        )
    threading.Thread(target=load, name="gpt2load-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if state.batcher is not None:
            state.batcher.close()
    if failure:
        raise failure[0]
