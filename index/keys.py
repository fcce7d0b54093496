"""Which Faiss index to build, and how to tune its search parameter to a recall target.

``--kind auto`` follows Faiss's guidelines (METHOD.md §5), with a deliberate CPU/GPU split of the
"exact up to a few million" rule: on a GPU, exact Flat search stays fast up to a few million vectors;
on a CPU, exact search over more than ~200k vectors costs more than IVF's build, so ``auto`` switches
to IVF there (the CPU benchmark's 1M vectors get IVF). IVF uses ``nlist`` ~ 4*sqrt(N) (a power of two,
at least 39 training points per list); the codes are Flat when they fit ``max_memory``, else SQ8,
else PQ. Beyond 10M vectors the coarse quantizer is an HNSW graph (``IVF..._HNSW32``).

After the build, :func:`tune` raises nprobe (IVF) or efSearch (HNSW) until recall@k against exact
search on a sample of the stored vectors reaches the target.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import UniretError

logger = logging.getLogger("uniret")

KINDS = ("auto", "flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
CPU_FLAT_LIMIT = 200_000
GPU_FLAT_LIMIT = 4_000_000
HNSW_QUANTIZER_LIMIT = 10_000_000
MIN_POINTS_PER_LIST = 39


def nlist_for(n: int) -> int:
    """A power of two near 4*sqrt(n), with at least 39 vectors per list (1 for tiny collections)."""
    if n < 2 * MIN_POINTS_PER_LIST:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(target))
    while nlist > 1 and n / nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return int(nlist)


def pq_code(dim: int, n: int) -> str:
    """``PQ{m}x{bits}``: m sub-vectors of 4 dims (or the largest divisor of dim <= dim/4), bits
    limited so that each sub-quantizer has enough training points."""
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    bits = int(max(1, min(8, math.floor(math.log2(max(2, n / MIN_POINTS_PER_LIST))))))
    return f"PQ{m}x{bits}"


def index_key(kind: str, n: int, dim: int, max_memory: int | None = None, gpu: bool = False) -> str:
    """The Faiss factory string for ``kind`` (one of :data:`KINDS`, or a factory string as is)."""
    if kind not in KINDS:
        return kind  # a factory string; validated when it is built
    if kind == "auto":
        flat_bytes = n * dim * 4
        fits = max_memory is None or flat_bytes <= max_memory
        if n <= (GPU_FLAT_LIMIT if gpu else CPU_FLAT_LIMIT) and fits:
            return "Flat"
        if fits:
            kind = "ivf-flat"
        elif max_memory is None or n * dim <= max_memory:
            kind = "ivf-sq8"
        else:
            kind = "ivf-pq"
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32"
    nlist = nlist_for(n)
    coarse = f"IVF{nlist}_HNSW32" if n > HNSW_QUANTIZER_LIMIT and not gpu else f"IVF{nlist}"
    codes = {"ivf-flat": "Flat", "ivf-sq8": "SQ8", "ivf-pq": pq_code(dim, n)}[kind]
    return f"{coarse},{codes}"


def new_index(key: str, dim: int):
    """An empty inner-product index for ``key`` that accepts ``add_with_ids``."""
    import faiss

    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise UniretError(f"--kind {key!r} is not a Faiss factory string Faiss accepts for dim {dim}: {first}; "
                          f"use one of {', '.join(KINDS)}") from None
    if ivf_of(index) is None:
        index = faiss.IndexIDMap2(index)
    return index


def check_lists(index, n: int, key: str) -> None:
    """Refuse an IVF with more lists than training vectors (Faiss would fail with a traceback)."""
    ivf = ivf_of(index)
    if ivf is not None and ivf.nlist > n:
        most = max(1, n // MIN_POINTS_PER_LIST)
        raise UniretError(f"--kind {key!r} has {ivf.nlist} lists but there are only {n:,} vectors to train them; "
                          f"use at most {most} lists (e.g. IVF{most},Flat) or --kind ivf-flat|ivf-sq8|ivf-pq, "
                          "which size the lists to the data")


def ivf_of(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_of(index):
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    inner = faiss.downcast_index(inner)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def search_param_name(index) -> str | None:
    if ivf_of(index) is not None:
        return "nprobe"
    if hnsw_of(index) is not None:
        return "efSearch"
    return None


def set_search_param(index, value: int | None) -> None:
    if value is None:
        return
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = int(value)
        return
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = int(value)


def candidate_values(index, k: int) -> list[int]:
    ivf = ivf_of(index)
    if ivf is not None:
        vals, p = [], 1
        while p < ivf.nlist:
            vals.append(p)
            p *= 2
        return vals + [ivf.nlist]
    if hnsw_of(index) is not None:
        base = max(16, k)
        return [base * 2 ** i for i in range(0, 9) if base * 2 ** i <= 16384]
    return []


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids -1 ignored)."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / total if total else 1.0


def is_lossy(key: str) -> bool:
    """Codes that lose precision (scalar or product quantisation): results are refined with the raw
    vectors kept beside the index."""
    codes = key.split(",")[-1]
    return codes.startswith(("SQ", "PQ", "OPQ", "LSH")) or "PQ" in codes


def tune(index, queries: np.ndarray, truth_ids: np.ndarray, k: int, target: float, search=None) -> dict:
    """Smallest nprobe/efSearch with recall@k >= target. ``search(queries, k) -> ids`` defaults to
    ``index.search``. Returns ``{"param", "value", "recall", "tried": [[value, recall], ...]}``; for
    exact indexes recall is measured once."""
    search = search or (lambda q, kk: index.search(q, kk)[1])
    name = search_param_name(index)
    tried = []
    if name is None:
        ids = search(queries, k)
        return {"param": None, "value": None, "recall": recall_at_k(ids, truth_ids), "tried": []}
    best = None
    for value in candidate_values(index, k):
        set_search_param(index, value)
        ids = search(queries, k)
        r = recall_at_k(ids, truth_ids)
        tried.append([value, round(r, 5)])
        best = (value, r)
        if r >= target:
            break
    value, r = best
    if r < target:
        logger.warning("index: recall@%d %.3f < target %.3f even at %s=%d", k, r, target, name, value)
    set_search_param(index, value)
    return {"param": name, "value": value, "recall": r, "tried": tried}
