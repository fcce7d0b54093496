"""Micro-batching: concurrent search requests gathered into one embed + search per batch.

Requests put a :class:`Job` (their prepared query rows and search parameters) on an asyncio queue.
One gatherer task takes the first job, then keeps taking jobs until the batch holds ``max_batch``
queries or ``max_wait_ms`` have passed, and hands the batch to a worker thread (two batches are in
flight at most, so one's decoding and search overlap the other's forward pass). A job may carry
its request's uploads still encoded (a prepare function): the worker decodes them, so a request
costs the event loop only its HTTP parsing. It waits only
while more requests are on their way (received, still being decoded: :meth:`MicroBatcher.incoming`),
so a lone request is never held back for the timer: the images of all
jobs go through the model in one forward pass, and jobs with the same (k, rerank, domain) are
searched as one query matrix. While the worker runs, new requests queue up and form the next batch,
so under load batches fill without waiting. Each job gets exactly the rows it would get alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..index.api import Index, QueryRows, Results

logger = logging.getLogger("uniret")


@dataclass
class Job:
    """One request's queries and parameters; ``future`` receives its :class:`Results`.

    ``rows`` is the request's prepared :class:`QueryRows`, or a function that prepares them (decodes
    and resizes its images), which the batch worker calls: then a request costs no thread hop of its
    own, and a batch's images are decoded by one thread while the other worker runs the model.
    ``expected`` is the number of queries the function will prepare (for the batch size)."""

    rows: QueryRows | Callable[[], QueryRows]
    k: int
    rerank: str | None
    domain: str | None
    threshold: float | None
    future: asyncio.Future = field(default=None, repr=False)
    expected: int = 1

    @property
    def size(self) -> int:
        return len(self.rows.labels) if isinstance(self.rows, QueryRows) else self.expected


def prepare_jobs(jobs: list[Job]) -> list[BaseException | None]:
    """Call the jobs' prepare functions (in the batch worker); a job whose input is bad gets its error."""
    errors: list[BaseException | None] = [None] * len(jobs)
    for j, job in enumerate(jobs):
        if not isinstance(job.rows, QueryRows):
            try:
                job.rows = job.rows()
            except Exception as exc:  # noqa: BLE001 - reported to this job only
                errors[j] = exc
    return errors


def search_jobs(index: Index, jobs: list[Job]) -> list[Results | BaseException]:
    """Embed every job's images in one pass, search jobs with equal parameters together, and split
    the results back per job (errors are returned per job, never raised across the batch)."""
    failed = prepare_jobs(jobs)
    if any(failed):
        ok = [j for j, exc in enumerate(failed) if exc is None]
        done = search_jobs(index, [jobs[j] for j in ok]) if ok else []
        out = list(failed)
        for j, outcome in zip(ok, done):
            out[j] = outcome
        return out
    searcher = index.searcher  # one version for the whole batch
    out: list[Results | BaseException] = [None] * len(jobs)
    try:
        images = [(j, r) for j, job in enumerate(jobs) for r in job.rows.image_rows]
        if images:
            vectors = index.embed_images([jobs[j].rows.model_input(r) for j, r in images])
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
    """The gatherer task and its worker threads (see the module docstring)."""

    def __init__(self, index: Index, max_batch: int = 32, max_wait_ms: float = 5.0, on_batch=None,
                 workers: int = 2):
        self.index = index
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch  # called with the number of queries of each batch (metrics)
        self.queue: asyncio.Queue[Job] | None = None
        self.arrived: asyncio.Event | None = None
        self.on_the_way = 0  # requests received and still being prepared (touched on the event loop only)
        # Two batches in flight: one worker's Python work (search, metadata) overlaps the other's forward pass.
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uniret-batch")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.arrived = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    @contextlib.contextmanager
    def incoming(self):
        """Mark a request as on its way to :meth:`submit` while it is being decoded."""
        self.on_the_way += 1
        try:
            yield
        finally:
            self.on_the_way -= 1

    async def submit(self, job: Job) -> Results:
        job.future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(job)
        self.arrived.set()
        return await job.future

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        size = batch[0].size
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            if self.queue.empty():
                if self.on_the_way == 0:
                    break  # nothing else is coming: do not hold this batch back for the timer
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Wait on an event, not on queue.get(): cancelling a get at the timeout could drop a job.
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except TimeoutError:
                    break
                continue
            job = self.queue.get_nowait()
            batch.append(job)
            size += job.size
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.workers)
        running = set()
        while True:
            await slots.acquire()  # gather the next batch only when a worker is free to take it
            batch = await self._gather()
            if self.on_batch is not None:
                self.on_batch(sum(job.size for job in batch))
            task = loop.create_task(self._process(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)

    async def _process(self, batch: list[Job], slots: asyncio.Semaphore) -> None:
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(self.pool, search_jobs, self.index, batch)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything
            outcomes = [exc] * len(batch)
        finally:
            slots.release()
        for job, outcome in zip(batch, outcomes):
            if job.future.done():  # the client went away
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
