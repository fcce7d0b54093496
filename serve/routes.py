"""The HTTP endpoints of `uniret serve` as an ``APIRouter``: each endpoint is one function, and the
errors it raises carry their HTTP status (``UniretError.http_status``), answered by the app's handler
(:mod:`uniret.serve.app`, which assembles the router, the middleware and the lifespan).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..errors import UniretError, UsageError
from ..index.api import MAX_K, Index, Results, UnknownIdError, parse_id, parse_ids
from .batcher import Job, MicroBatcher
from .metrics import ServerMetrics

STATIC = Path(__file__).resolve().parent / "static"
PARAMS = ("k", "rerank", "domain", "threshold")
# The page builds its DOM with textContent only; this policy would stop injected script anyway.
PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; object-src 'none'"
SEARCH_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "ids": {"type": "string", "description": "stored ids, comma or space separated"},
        **{p: {"type": "string"} for p in PARAMS}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "ids": {"type": "array", "items": {"type": "integer"}},
        "vectors": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "k": {"type": "integer", "default": 10}, "rerank": {"type": "string", "default": "none"},
        "domain": {"type": "string"}, "threshold": {"type": "number"}}}}}}}


class UnsupportedMediaType(UniretError):
    """A search request that is neither multipart nor JSON (HTTP 415)."""

    http_status = 415


def _media_type(data: bytes) -> str:
    for magic, kind in ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"


def parse_params(params: dict, index: Index) -> tuple[int, str | None, str | None, float | None]:
    """k, rerank, domain and threshold from query/form/JSON values, each checked."""
    from ..index.api import check_rerank

    raw_k = params.get("k", 10)
    if isinstance(raw_k, bool) or not (isinstance(raw_k, int) or (isinstance(raw_k, str) and raw_k.strip().isdigit())):
        raise UsageError(f"k must be an integer in 1..{MAX_K}, got {raw_k!r}")
    k = int(raw_k)
    if not 1 <= k <= MAX_K:
        raise UsageError(f"k must be in 1..{MAX_K}, got {k}")
    rerank = check_rerank(params.get("rerank") or None)
    domain = params.get("domain") or None
    if domain is not None and domain not in index.domains():
        raise UsageError(f"unknown domain {domain!r}; domains: {', '.join(index.domains())}")
    threshold = params.get("threshold")
    if threshold in (None, ""):
        threshold = None
    else:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise UsageError(f"threshold must be a number in [-1, 1], got {threshold!r}") from None
        if not (math.isfinite(threshold) and -1 <= threshold <= 1):
            raise UsageError(f"threshold must be a number in [-1, 1], got {threshold!r}")
    return k, rerank, domain, threshold


def prepare(index: Index, uploads: list[tuple[str, bytes]], ids: list, vectors) -> object:
    """Query rows of one request: decoded uploads (labelled by file name), stored ids, vectors."""
    queries: list = [data for _, data in uploads] + parse_ids(ids, what="ids: id").tolist()
    if vectors is not None:
        try:
            array = np.asarray(vectors, dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError("vectors: expected a list of equal-length lists of numbers") from None
        if array.ndim != 2 or array.shape[0] == 0:
            raise UsageError(f"vectors: expected a non-empty list of {index.dim}-number lists, got shape {array.shape}")
        queries.append(array)
    if not queries:
        raise UsageError("no query: send image file(s) (multipart), or JSON {\"ids\": [...]} or {\"vectors\": [[...]]}")
    # Decoded and resized here, in a request thread, so the batch worker only normalises and runs the model.
    return index.prepare(queries, labels={i: name for i, (name, _) in enumerate(uploads)})


async def read_search_request(request: Request, max_queries: int) -> tuple[list, list, object, dict]:
    """(uploads as (file name, bytes), ids, vectors, parameters) of a multipart or JSON search request."""
    params: dict = dict(request.query_params)
    uploads, ids, vectors = [], [], None
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=max_queries, max_fields=64) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    uploads.append((value.filename or key, await value.read()))
                elif key == "ids":
                    ids.extend(value.replace(",", " ").split())
                elif key in PARAMS:
                    params[key] = value
                else:
                    raise UsageError(f"unknown form field {key!r}; use file, ids, {', '.join(PARAMS)}")
    elif content_type.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise UsageError("the body is not valid JSON") from None
        if not isinstance(body, dict) or set(body) - {"ids", "vectors", *PARAMS}:
            raise UsageError(f"expected a JSON object with ids and/or vectors and {', '.join(PARAMS)}")
        ids, vectors = body.get("ids") or [], body.get("vectors")
        params.update({p: body[p] for p in PARAMS if p in body})
    else:
        raise UnsupportedMediaType("send multipart/form-data (image files) or application/json (ids or vectors)")
    if not isinstance(ids, list):
        raise UsageError("ids: expected a list of integer ids")
    count = len(uploads) + len(ids) + (len(vectors) if isinstance(vectors, list) else 0)
    if count > max_queries:
        raise UsageError(f"{count} queries in one request; at most {max_queries}")
    return uploads, ids, vectors, params


def _payload(results: Results) -> list[dict]:
    return [{"query": q.query, "results": [dict(row, image_url=f"/items/{row['id']}/image") for row in q.rows]}
            for q in results]


def build_router(index: Index, settings, batcher: MicroBatcher | None, metrics: ServerMetrics) -> APIRouter:
    """The endpoints serving ``index`` (``settings``: the app's ``ServeSettings``)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @router.get("/healthz")
    async def healthz():
        return {"status": "ok", "version": index.version}

    @router.get("/info")
    async def info():
        return {**await run_in_threadpool(index.info), "server": asdict(settings) | {"token": bool(settings.token)}}

    @router.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @router.get("/items/{item_id}")
    async def item(item_id: str):
        qid = parse_id(item_id)
        meta = index.item(qid)
        if meta is None:
            raise UnknownIdError(f"id {qid} is not in the index")
        return {**meta, "image_url": f"/items/{qid}/image"}

    @router.get("/items/{item_id}/image")
    async def item_image(item_id: str):
        data = await run_in_threadpool(index.image_bytes, parse_id(item_id))
        return Response(data, media_type=_media_type(data),
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=60"})

    @router.post("/search", openapi_extra=SEARCH_BODY)
    async def search(request: Request):
        """Multipart image file(s) (+ optional ``ids``), or JSON ``{"ids": [...]}`` / ``{"vectors": [[...]]}``;
        k, rerank, domain and threshold as query parameters, form fields or JSON keys."""
        started = time.perf_counter()
        with batcher.incoming() if batcher is not None else contextlib.nullcontext():
            uploads, ids, vectors, params = await read_search_request(request, settings.max_queries)
            k, rerank, domain, threshold = parse_params(params, index)
            if batcher is None:
                rows = await run_in_threadpool(prepare, index, uploads, ids, vectors)
        if batcher is not None:  # decoded in the batch worker: no thread hop per request
            results = await batcher.submit(Job(functools.partial(prepare, index, uploads, ids, vectors), k, rerank,
                                               domain, threshold, expected=max(1, len(uploads) + len(ids))))
        else:
            results = await run_in_threadpool(
                lambda: index.search_vectors(rows, index.embed_rows(rows), k=k, rerank=rerank, domain=domain,
                                             threshold=threshold))
        # JSONResponse directly: FastAPI's jsonable_encoder walk of every row costs more than the search.
        return JSONResponse({"version": index.version, "k": k, "rerank": rerank or "none", "domain": domain,
                             "threshold": threshold, "took_ms": round(1000 * (time.perf_counter() - started), 2),
                             "results": _payload(results)})

    return router
