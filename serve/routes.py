"""The HTTP endpoints of `uniret serve` as an ``APIRouter``: each endpoint is one function, and the
errors it raises carry their HTTP status (``UniretError.http_status``), answered by the app's handler
(:mod:`uniret.serve.app`, which assembles the router, the middleware and the lifespan).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..errors import UniretError, UsageError
from ..index.api import Index, Results, UnknownIdError, parse_id, parse_ids
from .batcher import Job, MicroBatcher
from .metrics import ServerMetrics
from .schemas import PARAMS, SearchParams, params_from_text, parse_body, validated

STATIC = Path(__file__).resolve().parent / "static"
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
        "domain": {"type": "string"}, "threshold": {"type": "number"},
        "where": {"type": "array", "items": {"type": "string"},
                  "description": "conditions on metadata fields, all must hold: [\"label == 'cat'\", \"price < 20\"]"}}}}}}}


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
    """k, rerank, domain and threshold from typed values (:mod:`uniret.serve.schemas`), each checked."""
    from ..index.api import check_rerank

    checked = validated(SearchParams, params)
    rerank = check_rerank(checked.rerank or None)
    domain = checked.domain or None
    if domain is not None and domain not in index.domains():
        raise UsageError(f"unknown domain {domain!r}; domains: {', '.join(index.domains())}")
    return checked.k, rerank, domain, checked.threshold


def parse_where_param(value) -> list[str]:
    """``where``: one condition or a list of them (:mod:`uniret.index.filters`), checked; 400 otherwise."""
    from ..index.api import check_where

    if value in (None, "", []):
        return []
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise UsageError("where: expected a condition such as \"label == 'cat'\" or a list of them")
    conditions = [value] if isinstance(value, str) else value
    check_where(conditions)
    return conditions


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
    """(uploads as (file name, bytes), ids, vectors, typed parameters) of a multipart or JSON search
    request; parameters in the body win over those in the query string (``where`` values add up)."""
    params: dict = params_from_text(dict(request.query_params))
    if "where" in request.query_params:
        params["where"] = request.query_params.getlist("where")
    uploads, ids, vectors = [], [], None
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=max_queries, max_fields=64) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    uploads.append((value.filename or key, await value.read()))
                elif key == "ids":
                    ids.extend(value.replace(",", " ").split())
                elif key == "where" and isinstance(value, str):
                    params["where"] = [*(params.get("where") or []), value]
                elif key in PARAMS:
                    params.update(params_from_text({key: value}))
                else:
                    raise UsageError(f"unknown form field {key!r}; use file, ids, {', '.join(PARAMS)}")
    elif content_type.startswith("application/json"):
        body = parse_body(await request.body())
        ids, vectors = body.ids, body.vectors
        params.update({p: getattr(body, p) for p in PARAMS if p in body.model_fields_set})
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
        k, rerank, domain, threshold and where as query parameters, form fields or JSON keys."""
        started = time.perf_counter()
        with batcher.incoming() if batcher is not None else contextlib.nullcontext():
            uploads, ids, vectors, params = await read_search_request(request, settings.max_queries)
            k, rerank, domain, threshold = parse_params(params, index)
            where = parse_where_param(params.get("where"))
            if batcher is None or where:
                rows = await run_in_threadpool(prepare, index, uploads, ids, vectors)
        if where:  # filtered queries are searched on their own (batches group by k, rerank and domain)
            results = await run_in_threadpool(
                lambda: index.search_vectors(rows, index.embed_rows(rows), k=k, rerank=rerank, domain=domain,
                                             threshold=threshold, where=where))
        elif batcher is not None:  # decoded in the batch worker: no thread hop per request
            results = await batcher.submit(Job(functools.partial(prepare, index, uploads, ids, vectors), k, rerank,
                                               domain, threshold, expected=max(1, len(uploads) + len(ids))))
        else:
            results = await run_in_threadpool(
                lambda: index.search_vectors(rows, index.embed_rows(rows), k=k, rerank=rerank, domain=domain,
                                             threshold=threshold))
        # JSONResponse directly: FastAPI's jsonable_encoder walk of every row costs more than the search.
        return JSONResponse({"version": index.version, "k": k, "rerank": rerank or "none", "domain": domain,
                             "threshold": threshold, "where": where, "took_ms": round(1000 * (time.perf_counter() - started), 2),
                             "results": _payload(results)})

    return router
