"""The FastAPI application: the endpoints' router (:mod:`uniret.serve.routes`), error mapping, token
and upload guards, live index updates.

Every failure a client can cause is a 4xx with ``{"error": "<one line>"}``: a bad query or
parameter 400 (422 for a malformed k or threshold), an unknown id or image 404, a body over the
upload limit 413, a wrong content type 415, a missing token 401. An unexpected server fault is a 500
with the same one-line shape (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import UniretError
from ..index.api import Index
from .batcher import MicroBatcher
from .connections import quiet_server_logs
from .guards import (
    LOOPBACK_HOSTS,
    BodyLimit,
    BodyTimeout,
    Guard,
    HostCheck,
    UploadTooLarge,
    check_token,
    too_large_message,
)
from .metrics import ServerMetrics
from .routes import STATIC, UnsupportedMediaType, build_router

__all__ = ["ServeSettings", "create_app", "UnsupportedMediaType"]

logger = logging.getLogger("uniret")


@dataclass
class ServeSettings:
    max_batch: int = 32  # queries per micro-batch; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long a batch waits to fill
    max_upload_mb: float = 20.0  # largest request body
    token: str | None = None  # bearer token required by every endpoint but /healthz
    max_queries: int = 256  # queries (files + ids + vectors) in one request
    refresh_seconds: float = 1.0  # how often CURRENT is checked for a new version
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host names answered ("*": any), see guards.allowed_hosts
    body_timeout: float = 30.0  # seconds a client may pause while sending a request body (then 408)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(index: Index, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving ``index`` (see the module docstring)."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics()
    metrics.items.set(index.count)
    batcher = (MicroBatcher(index, settings.max_batch, settings.max_wait_ms, on_batch=metrics.batch_size.observe)
               if settings.max_batch > 1 else None)

    async def watch_index() -> None:
        while True:
            await asyncio.sleep(settings.refresh_seconds)
            try:
                await run_in_threadpool(index.refresh)
            except Exception as exc:  # noqa: BLE001 - keep serving the version we have
                logger.warning("index %s: cannot load a new version (%s); still serving %s", index.root,
                               _one_line(exc), index.version)
            metrics.items.set(index.count)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_server_logs(asyncio.get_running_loop())
        if batcher is not None:
            batcher.start()
        watcher = asyncio.create_task(watch_index())
        yield
        watcher.cancel()
        if batcher is not None:
            await batcher.stop()

    # FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc pages load their scripts from the
    # installed package instead of a CDN, so they work on a machine without internet access.
    app = FastAPIOffline(title="uniret", version=__version__, lifespan=lifespan,
                         description="Search a uniret index by image similarity (read-only): POST /search with "
                                     "an image file, stored ids or vectors; GET /items/ID for an item.")
    check_token(settings.token)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 2**20), body_timeout=settings.body_timeout)
    app.add_middleware(Guard, token=settings.token, metrics=metrics)
    app.add_middleware(HostCheck, allowed=tuple(settings.allowed_hosts))  # added last: runs first

    @app.exception_handler(UniretError)
    async def uniret_error(request: Request, exc: UniretError):
        return _error(exc.http_status, _one_line(exc))  # each error class carries its status

    @app.exception_handler(BodyTimeout)
    async def body_timeout(request: Request, exc: BodyTimeout):
        return _error(408, f"the request body stopped arriving for {settings.body_timeout:g} s; send it whole")

    @app.exception_handler(UploadTooLarge)
    async def upload_too_large(request: Request, exc: UploadTooLarge):
        return _error(413, too_large_message(int(settings.max_upload_mb * 2**20)))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, _one_line(exc.detail) if exc.detail else "error")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.include_router(build_router(index, settings, batcher, metrics))
    return app
