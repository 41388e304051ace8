"""What a request must pass before its fields are read: its Host, its Content-Type, its size, and a JSON parse whose
cost is bounded by the body's size (nesting depth and number lengths checked).

A server on 127.0.0.1 is reachable from any web page the user visits: a page may POST `text/plain` without asking,
and a DNS-rebinding name makes the browser send the page's own host name. Requiring `application/json` (which a
cross-origin page cannot send without a CORS preflight, which this server never grants) and a known Host shuts both.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
from collections.abc import Awaitable, Callable, Iterable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from .protocol import APIError, clip

# Real bodies nest 4 deep (messages, content parts); json's C parser recurses, so 10^5 brackets would overflow it.
MAX_DEPTH = 64
# Longer numbers are no valid value of any field; Python's int() of thousands of digits is slow, then refused.
MAX_NUMBER_CHARS = 40
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


class BadNumber:
    """A number too long to be any field's value: kept as text, so the field that holds it is named in the 400."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _int(text: str) -> int | BadNumber:
    return BadNumber(text) if len(text) > MAX_NUMBER_CHARS else int(text)


def _float(text: str) -> float | BadNumber:
    return BadNumber(text) if len(text) > MAX_NUMBER_CHARS else float(text)


def _constant(text: str) -> BadNumber:
    return BadNumber(text)  # NaN and Infinity: not JSON, and no field's value


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """How deep `raw`'s arrays and objects nest (at least: an upper bound when it is <= MAX_DEPTH), from its
    brackets outside strings, without parsing it."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= MAX_DEPTH:
        return 0
    return max(itertools.accumulate(1 if c in b"[{" else -1 for c in brackets))


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object. Numbers too long for any field are kept as BadNumber (the field's own check
    then names it in the 400), NaN and Infinity too."""
    if json_depth(raw) > MAX_DEPTH:
        raise APIError(400, f"The JSON body nests deeper than {MAX_DEPTH} levels: flatten it.")
    try:
        body = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, "We could not parse the JSON body of your request: send valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


def check_content_type(request: Request) -> None:
    """POST bodies must say they are JSON (UTF-8): a cross-origin page cannot send that without a preflight."""
    given = request.headers.get("content-type")
    kind, *params = (given or "").split(";")
    charset = [
        p.split("=", 1)[1].strip().strip('"').lower() for p in params if p.strip().lower().startswith("charset=")
    ]
    if kind.strip().lower() != "application/json" or any(c not in ("utf-8", "utf8") for c in charset):
        raise APIError(
            415,
            f"Send the body as JSON with 'Content-Type: application/json', not {clip(given)}.",
            code="unsupported_media_type",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read as it arrives and refused (413) as soon as it passes `limit` bytes: never held whole."""
    too_large = APIError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes (--max-body-bytes).",
        code="request_too_large",
        headers={"Connection": "close"},  # else the server reads (and drops) the rest, to reuse the connection
    )
    declared = request.headers.get("content-length")
    if declared is not None and (len(declared) > 18 or int(declared) > limit):  # h11 checked it is digits
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise APIError(499, "client disconnected while sending the body") from None
    return bytes(body)


class HostRule:
    """Which `Host` headers a server bound to `bind` answers: loopback names, the bound address (any IP address
    when bound to all interfaces: a DNS-rebinding attack needs a name), and `extra` names ("*": any)."""

    def __init__(self, bind: str, extra: Iterable[str] = ()) -> None:
        self.any_ip = bind.strip("[]") in WILDCARDS
        self.names = {_norm(h) for h in (*LOOPBACK_NAMES, bind, *extra) if h.strip()}

    def allows(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = _norm(_strip_port(header))
        if "*" in self.names or name in self.names:
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_ip or ip.is_loopback


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _norm(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


class HostCheck:
    """ASGI middleware: a request whose Host the rule refuses gets a 400 before any route sees it."""

    def __init__(self, app, rule: HostRule, log: Callable[[str, int, str], None]) -> None:
        self.app, self.rule, self.log = app, rule, log

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host")
            text = host.decode("latin-1") if host is not None else None
            if not self.rule.allows(text):
                e = APIError(
                    400,
                    f"Host {clip(text)} is not this server's: use its address, or start it with --allowed-hosts.",
                    code="invalid_host",
                )
                self.log(scope["path"], e.status, "invalid_host")
                await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
