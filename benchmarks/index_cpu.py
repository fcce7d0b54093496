"""CPU index benchmark: the ``auto`` index vs exact Flat search, recall@100 and speed-up.

Synthetic clustered vectors (``--n`` x ``--dim``, ``--clusters`` Gaussian clusters on the sphere),
queries drawn from the same distribution but not stored. It writes an embedding store, builds the
index through ``uniret.index.build_index`` (the code path of ``uniret index build --kind auto``,
including nprobe tuning to ``--target-recall``), then measures in one run:

  exact: ``exact_search`` (faiss IndexFlatIP) of all queries, QPS; it is also the ground truth;
  auto:  ``Searcher.search`` of the same queries, QPS and recall@k against exact.

Target (issue 5): recall@100 >= 0.95 at >= 10x the exact QPS for 1M x 64 and 10k queries.

    python benchmarks/index_cpu.py                      # 1M x 64, 10k queries (a few minutes on 2 cores)
    python benchmarks/index_cpu.py --n 100000 --queries 1000
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


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 1 << 18
    for start in range(0, n, step):  # chunked: keeps the float64 temporaries small
        m = min(step, n - start)
        x = centers[rng.integers(0, clusters, m)] + noise * rng.normal(size=(m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.6, help="per-dimension noise around the cluster centres")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the store and index here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

    import faiss

    from uniret.data.collection import Item
    from uniret.embed.store import write_store
    from uniret.index import build_index, exact_search
    from uniret.index.keys import recall_at_k
    from uniret.index.searcher import Searcher

    work = args.workdir or Path(tempfile.mkdtemp(prefix="uniret-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = clustered(args.n + args.queries, args.dim, args.clusters, args.noise, seed=0)
    xb, xq = data[:args.n], data[args.n:]
    items = [Item(path=f"{i}.jpg", domain="synthetic", split="index", position=i) for i in range(args.n)]
    write_store(work / "store", xb, items, model={"config_hash": "benchmark"}, dtype="float16")
    prep_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    build_index(work / "store", work / "index", kind="auto", gpu="off", target_recall=args.target_recall,
                recall_k=args.k)
    build_s = time.perf_counter() - t0
    searcher = Searcher.open(work / "index", gpu="off", device="cpu")

    xb16 = searcher._full_vectors  # exactly the vectors the index holds (fp16-rounded)
    t0 = time.perf_counter()
    _, truth = exact_search(xq, xb16, args.k, device="cpu")
    exact_s = time.perf_counter() - t0

    searcher.search(xq[:100], args.k)  # warm-up
    t0 = time.perf_counter()
    _, found = searcher.search(xq, args.k)
    auto_s = time.perf_counter() - t0
    recall = recall_at_k(found, searcher.ids[truth])

    result = {
        "machine": f"CPU, {faiss.omp_get_max_threads()} threads",
        "n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
        "auto_key": searcher.key, "search_params": searcher.search_params,
        "build_recall_sample": searcher.manifest["recall"]["recall"],
        "exact_qps": round(args.queries / exact_s, 1), "auto_qps": round(args.queries / auto_s, 1),
        "speedup": round(exact_s / auto_s, 2), f"recall@{args.k}": round(recall, 4),
        "seconds": {"data+store": round(prep_s, 1), "build+tune": round(build_s, 1), "exact": round(exact_s, 2),
                    "auto": round(auto_s, 2)},
    }
    print(json.dumps(result, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
