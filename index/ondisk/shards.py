"""IVF shards of an on-disk build: the plan, the trained quantizer, and the worker that encodes a
range of store rows into a shard.

A build directory (``INDEX/ondisk-build``, ``INDEX/ondisk-update`` for ``index add``) holds::

    plan.json       what is built from what (fingerprint), the Faiss key, the shards' row positions
    rows.npy        (n,) int64 store rows to encode, ascending; ids.npy: the uniret ids they get
    trained.faiss   the trained, empty index (coarse quantizer and code tables) every shard shares
    shards/s00003/  ivf.faiss (an in-RAM IVF of the shard's rows), vectors.npy (their fp16 raw
                    vectors), shard.json; written as ``s00003.tmp-<pid>`` and renamed when complete

so a killed build re-runs only the shards that are missing, and N machines can each encode a part.
The store is read with plain reads, a range of rows at a time (:func:`read_store_rows`), and its
metadata streamed (:func:`iter_items`), part by part for stores in parts.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ... import testing
from ...data.collection import Item
from ...errors import UniretError
from ...utils import atomic_write_json, read_json, stable_hash
from .budget import CHUNK_ROWS
from .vectors import ArrayWriter, sync_and_evict

logger = logging.getLogger("uniret")

PLAN_FORMAT = "uniret-ondisk-build/1"
TRAINED = "trained.faiss"


# -- reading the store a range at a time ------------------------------------------------------------
def store_key(store) -> str:
    """Changes when the store is rewritten: its manifest and the size and mtime of its vectors."""
    stats = [p.file("embeddings.npy").stat() for p in store.parts]
    return stable_hash({"manifest": store.manifest, "files": [[st.st_size, st.st_mtime_ns] for st in stats]})


def read_store_rows(store, rows: np.ndarray) -> np.ndarray:
    """float32 vectors of ascending store ``rows``, read at most CHUNK_ROWS store rows at a time
    with plain reads across the store's parts (``EmbeddingStore.read_rows``), never through its
    memory maps, whose pages would stay in this process's RSS."""
    out = np.empty((len(rows), store.dim), dtype=np.float32)
    i = 0
    while i < len(rows):
        start = int(rows[i])
        j = int(np.searchsorted(rows, start + CHUNK_ROWS, side="left"))
        block = store.read_rows(start, int(rows[j - 1]) + 1)
        out[i:j] = block[np.asarray(rows[i:j]) - start]
        i = j
    return out


def iter_items(store, rows: np.ndarray) -> Iterator[tuple[int, Item]]:
    """(row, Item) for ascending ``rows`` (an array or a memory map), streamed from the store's
    metadata part by part (``EmbeddingStore.iter_items``, never all at once)."""
    wanted = (int(r) for start in range(0, len(rows), CHUNK_ROWS) for r in np.asarray(rows[start:start + CHUNK_ROWS]))
    nxt = next(wanted, None)
    for item_id, item in store.iter_items():
        if nxt is None:
            return
        if item_id - store.start == nxt:
            yield nxt, item
            nxt = next(wanted, None)
    if nxt is not None:
        raise UniretError(f"{store.path}: metadata ends before row {nxt}; the store is damaged, re-embed it")


# -- the plan ----------------------------------------------------------------------------------------
def read_plan(build_dir: Path) -> dict | None:
    try:
        plan = read_json(build_dir / "plan.json")
    except (OSError, ValueError):
        return None
    return plan if plan.get("format") == PLAN_FORMAT and (build_dir / TRAINED).is_file() else None


def write_valid_rows(store, build_dir: Path) -> int:
    """``rows.npy`` and ``ids.npy`` of a build: the store rows with an embedding (they keep their row
    number as id), streamed from the valid mask. Returns how many."""
    mask = store.valid_mask
    count = int(mask.sum())
    writer = ArrayWriter(build_dir / "rows.npy", (count,), np.int64)
    for start in range(0, len(mask), 1 << 22):
        writer.write(start + np.flatnonzero(mask[start:start + (1 << 22)]))
    writer.close()
    shutil.copyfile(build_dir / "rows.npy", build_dir / "ids.npy")
    return count


def write_plan(build_dir: Path, plan: dict, trained) -> None:
    """Write the trained index, then ``plan.json``: its presence means the plan is complete (rows.npy
    and ids.npy are written before both)."""
    import faiss

    tmp = build_dir / f".{TRAINED}.tmp-{os.getpid()}"
    faiss.write_index(trained, str(tmp))
    os.replace(tmp, build_dir / TRAINED)
    atomic_write_json(build_dir / "plan.json", dict(plan, format=PLAN_FORMAT))


def split_positions(n: int, shard_rows: int) -> list[list[int]]:
    return [[a, min(n, a + shard_rows)] for a in range(0, n, shard_rows)]


def part_shards(n_shards: int, part: int, parts: int) -> list[int]:
    """Shards of part ``part`` (0-based) of ``parts``: a contiguous block, so a machine reads one
    range of the store."""
    return list(range(part * n_shards // parts, (part + 1) * n_shards // parts))


def shard_dir(build_dir: Path, no: int) -> Path:
    return build_dir / "shards" / f"s{no:05d}"


def missing_shards(build_dir: Path, plan: dict, wanted: list[int] | None = None) -> list[int]:
    wanted = range(len(plan["shards"])) if wanted is None else wanted
    return [s for s in wanted if not (shard_dir(build_dir, s) / "shard.json").is_file()]


def clean_tmp(build_dir: Path) -> None:
    """Remove half-written shards of killed workers (complete shards are never touched)."""
    for p in (build_dir / "shards").glob("s*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# -- encoding one shard (runs in a worker process) ---------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_shard(build_dir: str, store_path: str, no: int, threads: int, trained: bytes | None = None,
                 tmp_name: str | None = None) -> int:
    """Encode shard ``no`` of the plan in ``build_dir``; returns its row count. Top-level so that
    spawned worker processes (and Ray tasks) can run it. ``trained``: the trained index's serialized
    bytes (shared through Ray's object store) instead of the build directory's file. ``tmp_name``:
    a fixed name for the half-written shard, which a retry of the same task removes and writes again
    (default: one per process). A shard already complete is never written again."""
    import faiss

    from ...embed.store import EmbeddingStore

    build = Path(build_dir)
    plan = read_plan(build)
    a, b = plan["shards"][no]
    if (shard_dir(build, no) / "shard.json").is_file():  # an earlier attempt of this task finished it
        return b - a
    faiss.omp_set_num_threads(max(1, threads))
    store = EmbeddingStore(store_path)
    rows = np.load(build / "rows.npy", mmap_mode="r")[a:b]
    ids = np.load(build / "ids.npy", mmap_mode="r")[a:b]
    if trained is None:
        index = faiss.read_index(str(build / TRAINED))
    else:
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    tmp = build / "shards" / (tmp_name or f"s{no:05d}.tmp-{os.getpid()}")
    if tmp_name:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ArrayWriter(tmp / "vectors.npy", (b - a, store.dim), np.float16)
    for c in range(0, b - a, CHUNK_ROWS):
        # Round through fp16: the lists then hold exactly the raw vectors kept beside the index.
        x16 = read_store_rows(store, np.asarray(rows[c:c + CHUNK_ROWS])).astype(np.float16)
        writer.write(x16)
        index.add_with_ids(x16.astype(np.float32), np.ascontiguousarray(ids[c:c + CHUNK_ROWS]))
    writer.close()
    faiss.write_index(index, str(tmp / "ivf.faiss"))
    with open(tmp / "ivf.faiss", "rb+") as f:
        sync_and_evict(f)
    atomic_write_json(tmp / "shard.json", {"positions": [a, b], "count": b - a,
                                           "ivf_bytes": (tmp / "ivf.faiss").stat().st_size})
    final = shard_dir(build, no)
    try:
        os.rename(tmp, final)
    except OSError:  # another process (another machine's --encode-part) finished it first
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(final.parent)
    testing.sleep_point("shard")  # lets tests kill a real build between shards
    return b - a


def encode_shards(build_dir: Path, store, shards: list[int], workers: int) -> None:
    """Encode ``shards`` with ``workers`` spawned processes (one fresh process per shard, so each
    one's memory is returned when its shard is written)."""
    import multiprocessing as mp
    import time
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    if not shards:
        return
    clean_tmp(build_dir)
    workers = min(workers, len(shards))
    threads = max(1, (os.cpu_count() or 1) // workers)
    t0, done = time.perf_counter(), 0
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(encode_shard, str(build_dir), str(store.path), s, threads): s for s in shards}
        try:
            for fut in as_completed(futures):
                done += 1
                logger.info("index: shard %d encoded (%d/%d, %s rows, %.0f s)", futures[fut], done, len(shards),
                            f"{fut.result():,}", time.perf_counter() - t0)
        except BrokenProcessPool:
            raise UniretError("an encoding worker died (out of memory?); re-run to resume with the shards "
                              "written so far, with a smaller --max-memory or fewer --workers") from None
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def check_shard(build_dir: Path, no: int, plan: dict) -> Path:
    """The complete shard directory ``no``, or a one-line error naming it when it is damaged."""
    path = shard_dir(build_dir, no)
    a, b = plan["shards"][no]
    try:
        info = read_json(path / "shard.json")
        problem = None
        if info.get("positions") != [a, b]:
            problem = f"it holds rows {info.get('positions')}, the plan says {[a, b]}"
        elif (path / "ivf.faiss").stat().st_size != info["ivf_bytes"]:
            problem = f"ivf.faiss has {(path / 'ivf.faiss').stat().st_size} bytes, {info['ivf_bytes']} were written"
    except (OSError, ValueError, KeyError) as exc:
        problem = str(exc)
    if problem:
        raise UniretError(f"shard {path} is damaged ({problem}); delete it and re-run to encode it again")
    return path
