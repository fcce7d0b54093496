"""Where one image query's time goes in `uniret serve`: each stage of the serving path timed alone.

Stages, per query (milliseconds, mean over ``--queries`` stored images, best of ``--repeat``):
upload parsing (Starlette's multipart parser on a real request body), decode, resize + normalise,
forward pass (alone at batch 1, and per image in a batch of ``--batch``), search (k=10, with the
metadata of the hits) and the JSON response. Two columns: *before* (a header probe then a full decode,
timm's per-image torch transform, torch eager, Faiss's OpenMP team for every search) and *after* (one
open, Pillow's reduced JPEG decode, the Pillow + numpy preprocessing with one normalisation per batch,
ONNX Runtime, one Faiss thread for small searches), measured side by side in one run. The queries are the stored images (the demo's
are 64 px PNGs) and, with ``--jpeg-side``, the same images as JPEG photos of that size.

    python benchmarks/serve_profile.py --index index-all --images uniret-demo/data
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import time
from pathlib import Path

import numpy as np


def best_ms(fn, items: list, repeat: int) -> float:
    """Mean milliseconds of ``fn(item)`` over ``items``, best of ``repeat`` passes."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return best * 1000


def multipart_body(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "uniretprofileboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


_LOOP = asyncio.new_event_loop()


def parse_upload(body_and_type) -> bytes:
    """Starlette's form parsing of one request, as the server does it (on one event loop)."""
    from starlette.requests import Request

    body, content_type = body_and_type

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def parse():
        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())],
                 "query_string": b"", "path": "/search"}
        async with Request(scope, receive).form() as form:
            return await form["file"].read()

    return _LOOP.run_until_complete(parse())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, required=True, help="index directory with a model copy")
    p.add_argument("--images", type=Path, required=True, help="packed store or collection root of the items")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="batch size of the batched forward pass")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jpeg-side", type=int, default=640, help="also profile the queries as JPEGs of this width (0: no)")
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import torch
    from PIL import Image
    from starlette.responses import JSONResponse

    import uniret
    from uniret.index.queries import decode_query_image

    torch_index = uniret.open_index(args.index, images=args.images, runtime="torch")
    onnx_index = uniret.open_index(args.index, images=args.images, runtime="onnx")
    model, onnx_model = torch_index.load_model(), onnx_index.load_model()
    transform = model.transforms()[1]
    prep = onnx_index._prep()
    draft = onnx_index.draft_size()
    ids = torch_index.searcher.ids[np.linspace(0, torch_index.count - 1, args.queries).round().astype(int)].tolist()
    sets = {"stored": [torch_index.image_bytes(i) for i in ids]}
    if args.jpeg_side:
        def photo(data: bytes) -> bytes:
            im = Image.open(io.BytesIO(data)).convert("RGB")
            im = im.resize((args.jpeg_side, args.jpeg_side * 3 // 4), Image.Resampling.BICUBIC)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=90)
            return out.getvalue()
        sets[f"jpeg {args.jpeg_side}px"] = [photo(d) for d in sets["stored"]]
    size = model.config.preprocess["input_size"]
    x1 = torch.randn(1, *size)
    xb = torch.randn(args.batch, *size)
    rows = {}
    with torch.inference_mode():
        forward = {
            "forward, batch 1": (best_ms(lambda x: model(x), [x1] * 16, args.repeat),
                                 best_ms(lambda x: onnx_model.run(x), [x1.numpy()] * 16, args.repeat)),
            f"forward, per image in a batch of {args.batch}": (
                best_ms(lambda x: model(x), [xb] * 4, args.repeat) / args.batch,
                best_ms(lambda x: onnx_model.run(x), [xb.numpy()] * 4, args.repeat) / args.batch),
        }
    vec = onnx_index.embed_images([decode_query_image(sets["stored"][0])])
    rows_of_query = onnx_index.prepare([vec])
    results = onnx_index.search_vectors(rows_of_query, vec, k=10)
    import uniret.index.searcher as searcher_module

    small = searcher_module.SMALL_SEARCH
    searcher_module.SMALL_SEARCH = 0  # before: Faiss's OpenMP team for every search, however small
    search_before = best_ms(lambda _: onnx_index.search_vectors(rows_of_query, vec, k=10), range(32), args.repeat)
    searcher_module.SMALL_SEARCH = small
    search_ms = best_ms(lambda _: onnx_index.search_vectors(rows_of_query, vec, k=10), range(32), args.repeat)
    payload = {"version": "v", "k": 10, "results": [{"query": q.query, "results": q.rows} for q in results]}
    json_ms = best_ms(lambda _: JSONResponse(payload).body, range(64), args.repeat)
    from uniret.data.images import decode_image

    def decode_before(data: bytes):
        """The decode before: a header probe, then a second open that decodes in full."""
        with Image.open(io.BytesIO(data)) as probe:
            probe.size  # noqa: B018
        return decode_image(data)

    for name, blobs in sets.items():
        bodies = [multipart_body("q.jpg", b) for b in blobs]
        full = [decode_query_image(b) for b in blobs]
        reduced = [decode_query_image(b, draft=draft) for b in blobs]
        before_pre = best_ms(lambda im: transform(im), full, args.repeat)
        # after: resize + crop per image in the request thread, one normalisation per batch in the worker
        pixels = np.stack([prep.pixels(im) for im in reduced[:args.batch]])
        after_pre = (best_ms(lambda im: prep.pixels(im), reduced, args.repeat)
                     + best_ms(lambda px: prep.normalise(px), [pixels], args.repeat) / len(pixels))
        table = {
            "upload parsing": (best_ms(parse_upload, bodies, args.repeat),) * 2,
            "decode": (best_ms(decode_before, blobs, args.repeat),
                       best_ms(lambda b: decode_query_image(b, draft=draft), blobs, args.repeat)),
            "resize + normalise": (before_pre, after_pre),
            **forward,
            "search (k=10)": (search_before, search_ms),
            "JSON response": (json_ms,) * 2,
        }
        rows[name] = {stage: {"before_ms": round(b, 3), "after_ms": round(a, 3)} for stage, (b, a) in table.items()}
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    for name, table in rows.items():
        print(f"\nqueries: {name} (load average {' '.join(load)})")
        print("| stage | before ms | after ms |\n|---|---|---|")
        for stage, r in table.items():
            print(f"| {stage} | {r['before_ms']:.3f} | {r['after_ms']:.3f} |")
    summary = {"rows": rows, "loadavg": load, "runtime_after": "onnx", "runtime_before": "torch"}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
