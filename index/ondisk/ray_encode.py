"""``uniret index build --on-disk --engine ray``: the encode step as Ray tasks, one per planned shard.

Train and merge stay one step each (on this machine); only the encoding of the planned shards,
the step that scales with the store, is spread over the cluster. The trained quantizer goes to the
tasks once, through Ray's object store, as its serialized bytes (the Faiss file format; every task
deserializes it with ``faiss.deserialize_index``): nothing of ours is pickled. Every task reads its
row range of the store and writes its shard into the build directory, so the store and ``--out``
must be on a filesystem that every node sees.

Each task asks Ray for the memory one shard's encoding needs (:func:`.budget.shard_task_bytes`), so
a node runs as many at once as its memory allows. A task whose worker process dies is re-run by Ray
(``max_retries``): it writes into a temporary directory named after its shard, which the retry
removes and writes again, and publishes it with one rename; a shard already complete is never
written again (:func:`.shards.encode_shard`). A build stopped for good keeps its complete shards: the
same command resumes with the missing ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ... import testing
from ...cluster import ray_session
from ...errors import UniretError
from .budget import MemoryPlan, shard_task_bytes
from .shards import TRAINED, clean_tmp, encode_shard

logger = logging.getLogger("uniret")

#: How often Ray re-runs the encoding of a shard whose worker process died.
MAX_RETRIES = 3


def tmp_name(no: int) -> str:
    """The half-written shard of task ``no``: one name for every attempt, so a retry replaces it."""
    return f"s{no:05d}.tmp-ray"


def encode_task(build_dir: str, store_path: str, no: int, trained: bytes, sleep: float = 0.0) -> int:
    """Shard ``no`` as one Ray task (one thread: Ray counts one CPU per task); returns its rows."""
    if sleep:
        time.sleep(sleep)  # a test's window to kill this task's worker process
    return encode_shard(build_dir, store_path, no, 1, trained, tmp_name(no))


def encode_shards_on_ray(build_dir: Path, store, shards: list[int], plan: dict, mem: MemoryPlan,
                         address: str | None, workers: int | None) -> None:
    """Encode ``shards`` of ``plan`` as Ray tasks (a local Ray of ``workers`` CPUs without ``address``)."""
    if not shards:
        return
    clean_tmp(build_dir)
    with ray_session(address, num_cpus=workers) as ray:
        trained = ray.put((build_dir / TRAINED).read_bytes())
        memory = shard_task_bytes(plan["nlist"], plan["dim"], plan["code_size"], plan["shard_rows"])
        task = ray.remote(encode_task).options(num_cpus=1, memory=memory, max_retries=MAX_RETRIES)
        t0, sleep = time.perf_counter(), testing.seconds("ray_shard")
        pending = {task.remote(str(build_dir), str(store.path), s, trained, sleep): s for s in shards}
        logger.info("index: %d shard(s) as Ray tasks (%s rows at most, %d MiB each)", len(shards),
                    f"{plan['shard_rows']:,}", memory >> 20)
        done = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                no = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise UniretError(f"encoding shard {no} failed on Ray after {MAX_RETRIES} retries "
                                      f"({_last_line(exc)}); re-run to resume with the shards written so far") from None
                done += 1
                logger.info("index: shard %d encoded (%d/%d, %s rows, %.0f s)", no, done, len(shards), f"{rows:,}",
                            time.perf_counter() - t0)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]
