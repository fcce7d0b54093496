"""Connections that one client cannot hold: a request-head timeout, a connection cap below the
descriptor limit, and one log line (not a flood) when descriptors run out anyway.

uvicorn times out idle keep-alive connections, but not a request whose head never completes: a
client that sends ``GET / HTTP/1.1\\r\\nHost: x\\r\\n`` and stops holds its connection (and a file
descriptor) forever, and a thousand such clients exhaust the process's descriptors, after which
every ``accept()`` fails and asyncio logs a traceback for each try. :func:`guarded_h11` returns
uvicorn's own h11 protocol with:

- a head timeout: a connection whose request head is not complete ``head_timeout`` seconds after
  its first byte (or after it opened) is closed;
- a connection cap (``max_connections``, below ``RLIMIT_NOFILE`` by a reserve): when a new
  connection would exceed it, the connections that have waited longest for a request head (a
  half-sent one, or an idle keep-alive one) are closed first, so a new client (``/healthz``) is
  served at once; connections in the middle of a request are never closed for this;

and :func:`quiet_accept_errors` reports a failing ``accept()`` (EMFILE, ENFILE, ENOBUFS) as one
warning line per minute (and drops the accept retry that asyncio still runs after the listening
socket was closed at shutdown), and :class:`OncePerInterval` keeps uvicorn's per-request warnings
("Invalid HTTP request received.", "Exceeded concurrency limit.") to one line per message a minute:
a client cannot fill the log. A slow request *body* is timed out by :class:`uniret.serve.guards.BodyLimit`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("uniret")

#: Descriptors kept free for the index, the model, logs and one accept batch (asyncio accepts up to
#: its backlog, 100, connections per wake-up before any of them is seen here).
FD_RESERVE = 160


def connection_cap(requested: int | None = None) -> int:
    """How many client connections to hold at most: ``requested``, and never more than the
    descriptor limit less :data:`FD_RESERVE`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = max(16, soft - FD_RESERVE) if soft != resource.RLIM_INFINITY else 1 << 16
    return min(requested, room) if requested else room


def guarded_h11(head_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head timeout and a connection cap (module docstring)."""
    waiting: dict[H11Protocol, float] = {}  # connections waiting for a request head, oldest first

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()
            excess = len(self.connections) - max_connections
            for victim in list(waiting)[:max(0, excess)]:
                if victim is not self:
                    victim._close("the server is at its connection limit")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._await_head()  # a partial head (of the first or of a keep-alive request)
            else:
                self._head_done()

        def connection_lost(self, exc) -> None:
            self._head_done()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._head_done()
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                waiting[self] = time.monotonic()  # idle (uvicorn's keep-alive timeout applies): evictable

        def _await_head(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout, self._close, "request head timed out")
                waiting.pop(self, None)
                waiting[self] = time.monotonic()

        def _head_done(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            waiting.pop(self, None)

        def _close(self, why: str) -> None:
            self._head_done()
            if not self.transport.is_closing():
                logger.debug("uniret serve: closing a connection from %s: %s", self.client, why)
                self.transport.close()

    return GuardedH11Protocol


class OncePerInterval(logging.Filter):
    """Let each distinct message of a logger through at most once per ``every`` seconds."""

    def __init__(self, every: float = 60.0):
        super().__init__()
        self.every = every
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        if now - self.last.get(key, float("-inf")) < self.every:
            return False
        if len(self.last) > 1000:  # bounded memory, whatever the messages
            self.last.clear()
        self.last[key] = now
        return True


def quiet_server_logs(loop: asyncio.AbstractEventLoop, every: float = 60.0) -> None:
    """:func:`quiet_accept_errors` on ``loop``, and :class:`OncePerInterval` on uvicorn's error log."""
    quiet_accept_errors(loop, every)
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, OncePerInterval) for f in log.filters):
        log.addFilter(OncePerInterval(every))


_ACCEPT_ERRORS = ("out of system resource", "Too many open files", "EMFILE", "ENFILE", "ENOBUFS")


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every: float = 60.0) -> None:
    """Report failing ``accept()`` calls as one warning line per ``every`` seconds (asyncio logs a
    traceback for each retry); other loop errors go to the previous handler."""
    previous = loop.get_exception_handler()
    last = [float("-inf")]
    skipped = [0]

    def handler(loop, context) -> None:
        exc = context.get("exception")
        text = f"{context.get('message', '')} {exc or ''}"
        if isinstance(exc, ValueError) and "_start_serving" in text and "file descriptor" in text:
            # After a failed accept() asyncio retries a second later; a server shut down in that second
            # has closed its listening socket, and the retry finds descriptor -1. Nothing is wrong.
            logger.debug("uniret serve: an accept retry after shutdown was dropped")
            return
        if any(e in text for e in _ACCEPT_ERRORS):
            now = time.monotonic()
            if now - last[0] >= every:
                more = f" ({skipped[0]} more since the last report)" if skipped[0] else ""
                logger.warning("uniret serve: cannot accept connections: out of file descriptors%s; raise "
                               "`ulimit -n`, or lower --max-connections", more)
                last[0], skipped[0] = now, 0
            else:
                skipped[0] += 1
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
