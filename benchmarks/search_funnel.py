"""Matryoshka funnel benchmark: shortlist with a prefix, rescore with the full vector.

Synthetic "nested" embeddings (most of the identity signal in the first dims, as a Matryoshka-trained
model puts it) in a Flat index. For each ``--shortlist-dim`` d and ``--shortlist-k`` K, measured in
one run through ``Searcher.search(..., shortlist_dim=d, shortlist_k=K)``: recall@k against full-dim
exact search and the speed-up over it.

    python benchmarks/search_funnel.py                       # 200k x 64, 1000 queries
    python benchmarks/search_funnel.py --n 20000 --queries 200
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def nested(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.geomspace(3.0, 0.3, dim)  # signal decays along the dims, like Matryoshka embeddings
    centers = rng.normal(size=(clusters, dim)) * scale
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim)) * scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shortlist-dim", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--shortlist-k", type=int, nargs="+", default=[100, 1000])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from uniret.data.collection import Item
    from uniret.embed.store import write_store
    from uniret.index import build_index
    from uniret.index.keys import recall_at_k
    from uniret.index.searcher import Searcher

    work = Path(tempfile.mkdtemp(prefix="uniret-funnel-"))
    try:
        data = nested(args.n + args.queries, args.dim, args.clusters, seed=0)
        xb, xq = data[:args.n], data[args.n:]
        items = [Item(path=f"{i}.jpg", domain="d", split="index", position=i) for i in range(args.n)]
        write_store(work / "store", xb, items, model={"config_hash": "funnel", "nested_dims": args.shortlist_dim},
                    dtype="float16")
        build_index(work / "store", work / "index", kind="flat", gpu="off")
        s = Searcher.open(work / "index", gpu="off", device="cpu")
        for d in args.shortlist_dim:
            s.prefix_vectors(d)  # build the prefix caches outside the timings
        s.search(xq[:10], args.k)
        t0 = time.perf_counter()
        _, full = s.search(xq, args.k)
        full_s = time.perf_counter() - t0
        rows = []
        for d in args.shortlist_dim:
            for kk in args.shortlist_k:
                t0 = time.perf_counter()
                _, ids = s.search(xq, args.k, shortlist_dim=d, shortlist_k=kk)
                sec = time.perf_counter() - t0
                rows.append({"shortlist_dim": d, "shortlist_k": kk, f"recall@{args.k}": round(recall_at_k(ids, full), 4),
                             "speedup": round(full_s / sec, 2)})
        result = {"machine": "cpu", "n": args.n, "dim": args.dim, "queries": args.queries,
                  "full_exact_s": round(full_s, 3), "funnel": rows}
        print(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
