"""What stands before every endpoint: the upload size limit and the bearer token.

:class:`BodyLimit` answers 413 when a request declares (Content-Length) or streams more than the
limit, before the body is parsed. :func:`token_ok` accepts the token as ``Authorization: Bearer T``
or as the ``uniret_token`` cookie, which ``GET /?token=T`` sets so that a browser (whose ``<img>``
tags cannot send headers) can use the page.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.responses import JSONResponse

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
