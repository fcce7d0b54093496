"""Micro-batching: concurrent search requests gathered into one embed + search per batch.

Requests put a :class:`Job` (their prepared query rows and search parameters) on an asyncio queue.
One gatherer task takes the first job, then keeps taking jobs until the batch holds ``max_batch``
queries or ``max_wait_ms`` have passed, and hands the batch to ONE worker thread: the images of all
jobs go through the model in one forward pass, and jobs with the same (k, rerank, domain) are
searched as one query matrix. While the worker runs, new requests queue up and form the next batch,
so under load batches fill without waiting. Each job gets exactly the rows it would get alone.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..index.api import Index, Results
from ..index.queries import QueryRows

logger = logging.getLogger("uniret")


@dataclass
class Job:
    """One request's queries and parameters; ``future`` receives its :class:`Results`."""

    rows: QueryRows
    k: int
    rerank: str | None
    domain: str | None
    threshold: float | None
    future: asyncio.Future = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.rows.labels)


def search_jobs(index: Index, jobs: list[Job]) -> list[Results | BaseException]:
    """Embed every job's images in one pass, search jobs with equal parameters together, and split
    the results back per job (errors are returned per job, never raised across the batch)."""
    searcher = index.searcher  # one version for the whole batch
    out: list[Results | BaseException] = [None] * len(jobs)
    try:
        images = [(j, r) for j, job in enumerate(jobs) for r in job.rows.image_rows]
        if images:
            vectors = index.embed_images([jobs[j].rows.images[r] for j, r in images])
            for (j, r), vec in zip(images, vectors):
                jobs[j].rows.vectors[r] = vec
    except Exception as exc:  # noqa: BLE001 - reported to every job of the batch
        return [exc] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for j, job in enumerate(jobs):
        groups.setdefault((job.k, job.rerank, job.domain), []).append(j)
    for (k, rerank, domain), members in groups.items():
        merged = QueryRows()
        for j in members:
            rows = jobs[j].rows
            for i in range(len(rows.labels)):
                merged.add(rows.labels[i], vector=rows.vectors[i], image=rows.images[i], stored_id=rows.ids[i])
        try:
            xq = np.stack(merged.vectors).astype(np.float32)
            results = index.search_vectors(merged, xq, k=k, rerank=rerank, domain=domain, searcher=searcher)
        except Exception as exc:  # noqa: BLE001 - reported to the jobs of this group
            for j in members:
                out[j] = exc
            continue
        start = 0
        for j in members:
            part = results[start:start + jobs[j].size]
            start += jobs[j].size
            threshold = jobs[j].threshold
            if threshold is not None:
                for q in part:
                    q.rows = [r for r in q.rows if r["score"] >= threshold]
            out[j] = Results(part, images=results.images)
    return out


class MicroBatcher:
    """The gatherer task and its worker thread (see the module docstring)."""

    def __init__(self, index: Index, max_batch: int = 32, max_wait_ms: float = 5.0, on_batch=None):
        self.index = index
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch  # called with the number of queries of each batch (metrics)
        self.queue: asyncio.Queue[Job] | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uniret-batch")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.worker.shutdown(wait=True)

    async def submit(self, job: Job) -> Results:
        job.future = asyncio.get_running_loop().create_future()
        await self.queue.put(job)
        return await job.future

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        size = batch[0].size
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Short sleeps instead of wait_for(queue.get()): a cancelled get could drop a job.
                await asyncio.sleep(min(remaining, 0.001))
                continue
            job = self.queue.get_nowait()
            batch.append(job)
            size += job.size
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if self.on_batch is not None:
                self.on_batch(sum(job.size for job in batch))
            try:
                outcomes = await loop.run_in_executor(self.worker, search_jobs, self.index, batch)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                outcomes = [exc] * len(batch)
            for job, outcome in zip(batch, outcomes):
                if job.future.done():  # the client went away
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
