"""What stands before every endpoint: the token, the request metrics, the upload size limit.

:class:`Guard` checks the token, answers an unexpected server fault with a one-line 500 (the
traceback goes to the log) and records every request's endpoint, status and latency.
:class:`BodyLimit` answers 413 when a request declares (Content-Length) or streams more than the
limit, before the body is parsed. :func:`token_ok` accepts the token as ``Authorization: Bearer T``
or as the ``uniret_token`` cookie, which ``GET /?token=T`` sets so that a browser (whose ``<img>``
tags cannot send headers) can use the page.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse

logger = logging.getLogger("uniret")

COOKIE = "uniret_token"


class UploadTooLarge(Exception):
    """The request body went over the limit while it was being read."""


def too_large_message(limit: int) -> str:
    return f"request body over the {limit / 2**20:g} MB upload limit (--max-upload-mb)"


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` (HTTP 413)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": too_large_message(self.max_bytes)}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise UploadTooLarge
            return message

        await self.app(scope, limited_receive, send)


def token_ok(expected: str | None, authorization: str | None, cookie: str | None) -> bool:
    if not expected:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else (cookie or "")
    return hmac.compare_digest(given.encode(), expected.encode())


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
