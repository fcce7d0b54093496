"""Memory planning of the on-disk IVF build: the training sample, the encoding workers, the rows per
shard and the merge window that fit a peak-RSS budget (``--max-memory``).

The build runs as one main process plus ``workers`` encoding processes at a time. Each process
starts at about :data:`BASE_RSS` (Python, numpy, Faiss and uniret imported: 222-233 MiB measured on
Linux x86_64 with the faiss-gpu wheel). On top of that:

- training (main process): the sample in float32, about :data:`TRAIN_COPIES` times over (the sample,
  its residuals, k-means temporaries), plus the quantizer;
- encoding (each worker): the trained index, a chunk of store rows, and its shard's inverted lists
  in RAM, counted twice because Faiss grows lists by doubling;
- merging (main process): one window of inverted lists read from the shards, the nprobe tuning's
  queries and the lists they touch (bounded by the same window).

Files are read and written with plain reads and writes, or memory-mapped only for a window at a
time, so page-cache pages of the store and the index never pile up in a process's RSS.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ...errors import UsageError

MiB = 1 << 20
BASE_RSS = 256 * MiB
DEFAULT_BUDGET = 4 << 30
TRAIN_COPIES = 4
POINTS_PER_LIST = 64       # k-means sample per list when memory allows (as the in-RAM build)
MIN_POINTS_PER_LIST = 39   # below this Faiss warns and the lists are poor
CHUNK_ROWS = 65_536        # store rows read and encoded at a time
MIN_SHARD_ROWS = 1_024
MAX_SHARD_ROWS = 1 << 20   # ~1M rows: the unit of resume and of parallel work
MIN_WINDOW = 4 * MiB
MAX_WINDOW = 512 * MiB
TUNE_FIXED = 64 * MiB      # tuning's queries, truth heaps and distance blocks


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    train_rows: int
    workers: int
    shard_rows: int
    window_bytes: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def quantizer_bytes(nlist: int, dim: int) -> int:
    """The trained index in RAM: centroids (plus an HNSW graph over them) and code tables."""
    return nlist * (dim * 4 + 256) + MiB


def _worker_fixed(nlist: int, dim: int) -> int:
    return BASE_RSS + quantizer_bytes(nlist, dim) + CHUNK_ROWS * dim * 10  # fp32 read + fp32 + fp16


def _per_shard_row(code_size: int, dim: int) -> int:
    return 2 * (code_size + 8) + 16  # lists grown by doubling, the row and id of each vector


def shard_task_bytes(nlist: int, dim: int, code_size: int, shard_rows: int) -> int:
    """Peak RSS of one process encoding one shard (what a Ray task asks for: ``--engine ray``)."""
    return _worker_fixed(nlist, dim) + shard_rows * _per_shard_row(code_size, dim)


def _train_need(rows: int, nlist: int, dim: int) -> int:
    return BASE_RSS + 2 * quantizer_bytes(nlist, dim) + rows * dim * 4 * TRAIN_COPIES


def _merge_need(window: int, nlist: int, dim: int) -> int:
    return BASE_RSS + quantizer_bytes(nlist, dim) + TUNE_FIXED + 2 * window


def shard_fit(budget: int, workers: int, nlist: int, dim: int, code_size: int) -> int:
    """Rows per shard that ``workers`` encoding processes beside the main one fit into ``budget``."""
    per_worker = (budget - BASE_RSS) // max(1, workers)
    return max(0, (per_worker - _worker_fixed(nlist, dim)) // _per_shard_row(code_size, dim))


def minimum_budget(n: int, nlist: int, dim: int, code_size: int) -> int:
    """The smallest budget with which the build works (one worker, the smallest sample and shard)."""
    train = _train_need(min(n, MIN_POINTS_PER_LIST * nlist), nlist, dim)
    encode = BASE_RSS + _worker_fixed(nlist, dim) + min(n, MIN_SHARD_ROWS) * _per_shard_row(code_size, dim)
    return max(train, encode, _merge_need(MIN_WINDOW, nlist, dim))


MAX_WORKERS = 1_024


def check_workers(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be 1..{MAX_WORKERS:,} (this machine has {os.cpu_count()} CPUs), got {workers}")
    return int(workers)


def plan_memory(budget: int, n: int, dim: int, nlist: int, code_size: int, workers: int,
                shard_rows: int | None = None) -> MemoryPlan:
    """Choose sample size, workers, shard size and merge window for ``n`` vectors within ``budget``.

    A budget below :func:`minimum_budget` is refused with a one-line error that says the minimum;
    fewer workers than asked are used when their shards would not fit.
    """
    need = minimum_budget(n, nlist, dim, code_size)
    if budget < need:
        raise UsageError(f"--max-memory {fmt_bytes(budget)} is too small for {n:,} x {dim} vectors in {nlist} "
                         f"lists; the on-disk build needs at least {fmt_bytes(need)}")
    per_row = dim * 4 * TRAIN_COPIES
    fit = (budget - _train_need(0, nlist, dim)) // per_row
    train_rows = int(min(n, max(POINTS_PER_LIST * nlist, 65_536), fit))
    if shard_rows is not None and shard_rows < 1:
        raise UsageError(f"--shard-rows must be >= 1, got {shard_rows}")
    if shard_rows is None:  # one shard per worker, but never shards of a few rows (a process each)
        want = min(MAX_SHARD_ROWS, max(MIN_SHARD_ROWS, math.ceil(n / workers)))
    else:
        want = shard_rows
    want = max(1, min(want, n))
    workers = max(1, min(workers, math.ceil(n / want)))  # no more processes than shards
    while workers > 1 and shard_fit(budget, workers, nlist, dim, code_size) < min(want, MIN_SHARD_ROWS):
        workers -= 1
    fit_rows = shard_fit(budget, workers, nlist, dim, code_size)
    if shard_rows is not None and shard_rows > fit_rows:
        raise UsageError(f"shards of {shard_rows:,} rows do not fit --max-memory {fmt_bytes(budget)} with "
                         f"{workers} worker(s); use --shard-rows {fit_rows:,} or less, or a larger --max-memory")
    rows = int(min(want, fit_rows))
    window = (budget - _merge_need(0, nlist, dim)) // 2
    return MemoryPlan(budget=int(budget), train_rows=train_rows, workers=int(workers), shard_rows=rows,
                      window_bytes=int(max(MIN_WINDOW, min(MAX_WINDOW, window))))
