"""What stands before every endpoint: the Host check, the token, the request metrics, the upload
size limit and the body timeout.

:class:`HostCheck` answers only requests whose ``Host`` header names this server (Starlette's
``TrustedHostMiddleware``): on a loopback bind only loopback names, so that a web page the user
visits cannot read the server through a DNS name rebound to 127.0.0.1; other names with
``--allowed-host``. Tokens are visible ASCII (:func:`check_token`), as HTTP headers carry them.

:class:`Guard` checks the token, answers an unexpected server fault with a one-line 500 (the
traceback goes to the log) and records every request's endpoint, status and latency.
:class:`BodyLimit` answers 413 when a request declares (Content-Length) or streams more than the
limit, before the body is parsed, and 408 when the client stops sending its body for longer than
the body timeout. :func:`token_ok` accepts the token as ``Authorization: Bearer T``
or as the ``uniret_token`` cookie, which ``GET /?token=T`` sets so that a browser (whose ``<img>``
tags cannot send headers) can use the page.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse

from ..errors import UsageError

logger = logging.getLogger("uniret")

COOKIE = "uniret_token"


#: The Host names of a server bound to a loopback address.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")


class UploadTooLarge(Exception):
    """The request body went over the limit while it was being read."""


class BodyTimeout(Exception):
    """The client stopped sending its request body."""


def check_token(token: str | None) -> str | None:
    """A token a client can send in a header: 1-512 visible ASCII characters (no spaces)."""
    if token is not None and not _TOKEN.fullmatch(token):
        raise UsageError("--token must be 1-512 visible ASCII characters (letters, digits, punctuation; no spaces "
                         "or other scripts): HTTP headers cannot carry anything else")
    return token


def allowed_hosts(bind: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The Host names answered: loopback names (and the bind address) on a loopback bind, plus
    ``extra`` (``--allowed-host``); any name on another bind unless ``extra`` names some."""
    names = []
    for name in extra:
        name = name.strip().lower()
        if not name or "*" in name[1:] or (name.startswith("*") and not name.startswith("*.")) or "/" in name:
            raise UsageError(f"--allowed-host {name!r}: give a host name (example.org), an address, or *.example.org")
        names.append(name)
    if is_loopback(bind):
        shown = f"[{bind.strip('[]')}]" if ":" in bind else bind
        return tuple(dict.fromkeys([*LOOPBACK_HOSTS, shown.lower(), *names]))
    return tuple(names) or ("*",)


class HostCheck:
    """ASGI middleware: Starlette's ``TrustedHostMiddleware`` decides; a refused request gets the
    API's one-line JSON error (400) instead of its plain text."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app = app
        self.allowed = allowed
        self.check = TrustedHostMiddleware(self._passed, allowed_hosts=list(allowed), www_redirect=False)

    @staticmethod
    async def _passed(scope, receive, send) -> None:
        scope["uniret.host_ok"] = True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or "*" in self.allowed:
            return await self.app(scope, receive, send)

        async def swallow(message) -> None:
            pass

        await self.check(scope, receive, swallow)
        if scope.pop("uniret.host_ok", False):
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host", "")
        response = JSONResponse({"error": f"Host {host[:80]!r} is not a name this server answers to (a DNS rebinding "
                                          "attempt?); open it by its address, or start it with --allowed-host NAME"},
                                status_code=400)
        await response(scope, receive, send)


def too_large_message(limit: int) -> str:
    return f"request body over the {limit / 2**20:g} MB upload limit (--max-upload-mb)"


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` (HTTP 413)."""

    def __init__(self, app, max_bytes: int, body_timeout: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": too_large_message(self.max_bytes)}, status_code=413)
            return await response(scope, receive, send)
        seen = 0
        complete = False

        async def limited_receive():
            nonlocal seen, complete
            if complete:  # after the body: waiting for a disconnect is not a stalled upload
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise UploadTooLarge
            return message

        await self.app(scope, limited_receive, send)


def token_ok(expected: str | None, authorization: str | None, cookie: str | None) -> bool:
    if not expected:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else (cookie or "")
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: token check, one-line 500s, per-request metrics (see the module docstring)."""

    def __init__(self, app, token: str | None, metrics):
        self.app = app
        self.token = token
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [0]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        request = Request(scope)
        if scope["path"] != "/healthz" and not token_ok(self.token, request.headers.get("authorization"),
                                                        request.cookies.get(COOKIE)):
            if scope["path"] == "/" and token_ok(self.token, None, request.query_params.get("token")):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            else:
                response = JSONResponse({"error": "missing or wrong token: send 'Authorization: Bearer <token>' "
                                                  "(or open /?token=<token> in a browser)"}, status_code=401)
            await response(scope, receive, send_and_record)
        else:
            try:
                await self.app(scope, receive, send_and_record)
            except Exception:  # a server fault: one line to the client, the traceback to the log
                logger.exception("uniret serve: %s %s failed", scope.get("method"), scope["path"])
                if not status[0]:
                    response = JSONResponse({"error": "internal server error; see the server log"}, status_code=500)
                    await response(scope, receive, send_and_record)
        route = scope.get("route")
        self.metrics.observe(getattr(route, "path", "other"), status[0] or 500, time.perf_counter() - start)
