"""``uniret embed --engine ray``: the embedding run as a Ray Data pipeline on a cluster.

The store is the one a single process writes, cut into ``K`` parts: one per block of ``block_rows``
input rows (one per shard for tar input), part ``k`` holding slice ``k`` of ``K`` (an
:class:`~uniret.embed.store.parts.EmbedJob` with ``K`` "ranks"), ids the input's row ids. Read in
id order it equals a single-process run row for row; ``uniret store info`` shows its parts.

The pipeline (Ray Data, streaming, nothing materialised):

1. read: the rows still to embed, as units ``(part k, rows a..b)`` of at most ``UNIT_ROWS``;
2. decode: CPU tasks (:func:`decode_units`): bytes -> ``decode_image`` -> the model's eval
   transform, ``batch_size`` rows at a time; an unreadable image is a zero input marked failed
   with its reason (listed in the store as in a single-process run), never a failed task;
3. embed: an actor pool (:class:`EmbedActor`): one actor per GPU of the cluster, or CPU actors
   (half of ``--workers``, the other half decodes). Each rebuilds the model from its safetensors
   bytes (or the ONNX graph's bytes) shared once through the object store, and runs the same
   forward pass as one process (:class:`~uniret.embed.batches.Forward`);
4. write: this process (the driver, which must see ``--out``) receives the vectors, writes each
   part with :class:`~uniret.embed.store.writer.PartWriter` (rows by id, checkpointed), finishes a
   part when its last row arrives, and writes the manifest once, at the end.

Faults: Ray retries a decode task whose worker process died, restarts a dead actor and retries its
batches (Ray Data's defaults for actor pools). A row delivered twice is written once (the driver
keeps which rows it has), so the store holds each row once. A run stopped for good (the driver, or
the cluster, lost) leaves its finished parts and checkpointed rows in ``<out>.partial``: the same
command resumes them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import testing
from ..cluster import ray_session
from ..data.collection import ItemList, slice_bounds
from ..errors import UniretError, UsageError
from ..utils import progress_bar
from .batches import EmbedDataset, Forward, RowSink, publish
from .model import UniversalEmbedder
from .store.layout import part_name
from .store.parts import EmbedJob
from .store.reader import EmbeddingStore

logger = logging.getLogger("uniret")

#: Input rows per store part (the unit of the output files and of resume) by default.
BLOCK_ROWS = 100_000
#: A decode task's memory besides its batches (bytes, a scheduling request): a worker process with torch loaded.
DECODE_MEMORY = 768 << 20
#: Rows per decode task's unit (the task streams ``batch_size`` rows at a time).
UNIT_ROWS = 1_024


def count_parts(items, block_rows: int | None = None) -> int:
    """``K``: one part per ``block_rows`` rows of an item list, one per shard of tar input."""
    if isinstance(items, ItemList):
        return max(1, math.ceil(len(items) / (block_rows or BLOCK_ROWS)))
    return len(items.paths)


def part_length(items, k: int, parts: int) -> int:
    """Rows of part ``k`` of ``parts`` without listing it (tar shards: their counts)."""
    if isinstance(items, ItemList):
        a, b = slice_bounds(len(items), k, parts)
        return b - a
    first, stop = slice_bounds(len(items.paths), k, parts)
    return sum(items.count(s) for s in range(first, stop))


def check_device(device: str | None) -> str:
    """``--device`` under Ray: auto (GPU actors when the cluster has GPUs), cpu or cuda (every GPU)."""
    name = "auto" if device is None else str(device).strip().lower()
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device!r} with --engine ray: use auto, cpu or cuda (one actor per GPU of the "
                         "cluster; cuda:N names a GPU of one machine)")
    return name


# -- worker side: decode tasks and embedding actors ------------------------------------------------

_SHARED: dict = {}


def _shared(ref):
    """``ray.get(ref)`` once per worker process (a decode task's item list)."""
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()  # one run's input at a time
        _SHARED[key] = ray.get(ref)
    return _SHARED[key]


_PARTS: dict = {}


def _part_items(items_ref, k: int, parts: int) -> ItemList:
    items = _shared(items_ref)
    key = (id(items), k)
    if key not in _PARTS:
        if len(_PARTS) >= 8:
            _PARTS.clear()
        _PARTS[key] = items.part(k, parts)
    return _PARTS[key]


def decode_units(batch: dict, items, parts: int, preprocess: dict, batch_size: int) -> Iterator[dict]:
    """Ray Data's decode step: each unit ``(k, a, b)`` -> batches of ``(k, row, pixels, ok, reason)``."""
    from .preprocess import eval_transform

    transform = eval_transform(preprocess)
    for k, a, b in zip(batch["k"], batch["a"], batch["b"]):
        part = _part_items(items, int(k), parts)
        for s in range(int(a), int(b), batch_size):
            rows = np.arange(s, min(int(b), s + batch_size))
            dataset = EmbedDataset(part, rows, transform, preprocess["input_size"])
            samples = [dataset[j] for j in range(len(rows))]
            yield {"k": np.full(len(rows), int(k), dtype=np.int64), "row": rows,
                   "pixels": torch.stack([x for _, x, _, _ in samples]).numpy(),
                   "ok": np.array([ok for _, _, ok, _ in samples], dtype=bool),
                   "reason": np.array([reason for _, _, _, reason in samples], dtype=object)}


class EmbedActor:
    """Ray Data's embedding step: the model (rebuilt from bytes) on one GPU, or on ``threads`` CPU threads."""

    def __init__(self, model, graph, device: str, amp: bool, threads: int, sleep: float = 0.0):
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        config, weights = _shared(model)
        onnx = None
        if graph is not None:
            from .onnx import OnnxEmbedder

            onnx = OnnxEmbedder(_shared(graph), device=device, threads=threads if device == "cpu" else None)
        # Ray gives a GPU actor its GPU as the only visible one
        dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.forward = Forward(UniversalEmbedder.from_bytes(config, weights), dev, amp, onnx)
        self.sleep = sleep

    def __call__(self, batch: dict) -> dict:
        vectors, ok, reasons = self.forward(torch.from_numpy(np.array(batch["pixels"])),  # a writable copy
                                            np.asarray(batch["ok"], dtype=bool), [str(r) for r in batch["reason"]])
        if self.sleep:
            time.sleep(self.sleep)  # a test's window to kill this actor's process
        return {"k": batch["k"], "row": batch["row"], "vector": vectors, "ok": ok,
                "reason": np.array(reasons, dtype=object)}


# -- driver side: planning, the pipeline, the writer ---------------------------------------------

def rows_to_embed(job: EmbedJob) -> dict[int, np.ndarray]:
    """Part ``k`` -> its rows still to embed, for every unfinished part (resume: finished parts are
    skipped, a part left half-done continues with its missing rows)."""
    todo = {}
    for k in range(job.parts):
        name = part_name(k, job.parts)
        started = (job.partial / "parts" / name).exists() or (job.partial / "parts" / f"{name}.partial").exists()
        if started:
            writer = job.open_part(restart=False, k=k)
            if writer is None:
                continue
            todo[k] = writer.missing_rows()
            del writer
        else:
            todo[k] = np.arange(part_length(job.items, k, job.parts))
    return todo


def units(todo: dict[int, np.ndarray], unit_rows: int = UNIT_ROWS) -> list[dict]:
    """The read step's rows: runs of consecutive rows of a part, at most ``unit_rows`` each."""
    out = []
    for k, rows in todo.items():
        for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):
            for i in range(0, len(run), unit_rows):
                chunk = run[i:i + unit_rows]
                out.append({"k": int(k), "a": int(chunk[0]), "b": int(chunk[-1]) + 1})
    return out


class PartSink:
    """The driver's writer: rows from the actors into their parts, each row once; a part is
    finished (metadata, part.json, one rename) when its last row arrives."""

    def __init__(self, job: EmbedJob, todo: dict[int, np.ndarray], checkpoint_every: int):
        self.job, self.checkpoint_every = job, checkpoint_every
        self.pending = {k: len(rows) for k, rows in todo.items()}
        self.open: dict[int, tuple] = {}  # k -> (writer, row sink, rows already there)
        self.batches = 0
        for k in [k for k, n in self.pending.items() if n == 0]:
            self._finish(k)

    def _part(self, k: int) -> tuple:
        if k not in self.open:
            writer = self.job.open_part(restart=False, k=k)
            if writer is None:
                raise UniretError(f"{self.job.partial}: part {k} was finished by another run meanwhile; re-run")
            self.open[k] = (writer, RowSink(writer), np.asarray(writer.done).copy())
        return self.open[k]

    def add(self, batch: dict) -> int:
        """Write one batch of the actors' output; returns how many rows were new."""
        new = 0
        ks = np.asarray(batch["k"])
        for k in np.unique(ks).tolist():
            sel = np.flatnonzero(ks == k)
            writer, sink, have = self._part(k)
            rows = np.asarray(batch["row"])[sel]
            fresh = ~have[rows]  # a retried task's rows come again: keep the first copy
            sel, rows = sel[fresh], rows[fresh]
            if not len(rows):
                continue
            have[rows] = True
            sink.add(rows, np.asarray(batch["vector"])[sel], np.asarray(batch["ok"], dtype=bool)[sel],
                     [str(r) for r in np.asarray(batch["reason"])[sel]])
            self.pending[k] -= len(rows)
            new += len(rows)
            if self.pending[k] == 0:
                self._finish(k)
        self.batches += 1
        if self.batches % self.checkpoint_every == 0:
            for _, sink, _ in self.open.values():
                sink.flush()
        return new

    def _finish(self, k: int) -> None:
        if k in self.open:
            writer, sink, _ = self.open.pop(k)
            sink.flush()
        else:
            writer = self.job.open_part(restart=False, k=k)
            if writer is None:
                return
        writer.finish()

    def close(self) -> None:
        """Checkpoint what is open; an error when rows never came back (a re-run resumes them)."""
        for _, sink, _ in self.open.values():
            sink.flush()
        missing = {k: n for k, n in self.pending.items() if n}
        if missing:
            k = next(iter(missing))
            raise UniretError(f"{sum(missing.values())} rows never came back from the Ray workers (first in part "
                              f"{k}); they are checkpointed as missing: re-run the same command to resume")


def embed_on_ray(model: UniversalEmbedder, job: EmbedJob, device: str | None, batch_size: int, workers: int | None,
                 resume: bool, amp: bool, checkpoint_every: int, address: str | None, onnx=None) -> EmbeddingStore:
    """Embed ``job``'s parts on Ray (see the module docstring) and publish the store."""
    device = check_device(device)
    with ray_session(address, num_cpus=workers) as ray:
        job.prepare(restart=not resume)
        todo = rows_to_embed(job)
        total = sum(len(r) for r in todo.values())
        done = sum(part_length(job.items, k, job.parts) for k in range(job.parts)) - total
        if done:
            logger.info("resuming %s: %d rows already embedded, %d to go", job.out, done, total)
        if total:
            _run(ray, model, job, todo, total, device, batch_size, workers, amp, checkpoint_every, onnx)
        else:
            PartSink(job, todo, checkpoint_every).close()
        return publish(job)


def _resources(ray, device: str, workers: int | None) -> dict:
    """The actor pool: one actor per GPU, or CPU actors for half of ``workers`` (at most the cluster's
    CPUs): the other half decodes."""
    have = ray.cluster_resources()
    gpus, cpus = int(have.get("GPU", 0)), max(1, int(have.get("CPU", 1)))
    if device == "cuda" and not gpus:
        raise UniretError("--device cuda: the Ray cluster has no GPU; use --device cpu (or auto)")
    # a task or actor takes one CPU; on a 1-CPU cluster half of it, so that decoding is never starved
    task_cpus = 1 if cpus >= 2 else 0.5
    if device != "cpu" and gpus:
        return {"device": "cuda", "actors": gpus, "num_gpus": 1, "threads": 1, "cpus": cpus, "task_cpus": task_cpus}
    budget = min(workers or cpus, cpus)
    actors = max(1, budget // 2)
    return {"device": "cpu", "actors": actors, "num_gpus": 0, "threads": max(1, budget // actors), "cpus": cpus,
            "task_cpus": task_cpus}


def _run(ray, model, job, todo, total, device, batch_size, workers, amp, checkpoint_every, onnx) -> None:
    res = _resources(ray, device, workers)
    graph = None
    if onnx is not None:
        graph = ray.put(onnx.graph if isinstance(onnx.graph, bytes) else Path(onnx.graph).read_bytes())
    items_ref, model_ref = ray.put(job.items), ray.put(model.to_bytes())
    work = units(todo)
    logger.info("ray: %d rows in %d part(s), %d %s actor(s), decoding on CPU tasks", total, len(todo),
                res["actors"], "GPU" if res["device"] == "cuda" else "CPU")
    ds = ray.data.from_items(work, override_num_blocks=max(1, min(len(work), 4 * res["cpus"])))
    # A decode task reserves the memory of the batches it holds; that request of its own also keeps
    # Ray Data from fusing this step into the actors: decoding runs on its own CPU tasks, in parallel
    # with the forward passes. Ray re-runs a task whose worker died (its default max_retries).
    pixels = 4 * int(np.prod(model.config.preprocess["input_size"]))
    ds = ds.map_batches(decode_units, batch_size=1, batch_format="numpy", num_cpus=res["task_cpus"],
                        memory=DECODE_MEMORY + 4 * batch_size * pixels,
                        fn_kwargs={"items": items_ref, "parts": job.parts, "preprocess": model.config.preprocess,
                                   "batch_size": batch_size})
    ds = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=res["actors"]),
                        num_cpus=res["task_cpus"], num_gpus=res["num_gpus"],
                        fn_constructor_kwargs={"model": model_ref, "graph": graph, "device": res["device"], "amp": amp,
                                               "threads": res["threads"], "sleep": testing.seconds("ray_batch")})
    sink = PartSink(job, todo, checkpoint_every)
    start = time.perf_counter()
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        with progress_bar("embedding (ray)", total) as advance:
            for batch in batches:
                advance(sink.add(batch))
    finally:
        batches.close()  # stops the pipeline (its actors hold CPUs and GPUs) also when this run fails
    sink.close()
    seconds = time.perf_counter() - start
    logger.info("embedded %d images in %.1fs (%.1f images/s) on ray", total, seconds, total / max(seconds, 1e-9))
