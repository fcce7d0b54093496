"""Extraction: images of an ItemList -> an embedding store, fast, resumable, on 1..N processes.

The loader carries each item's id (its row) through DataLoader workers that read bytes, decode
(``uniret.data.images.decode_image``) and preprocess; the main process only moves batches to the
device and runs the model (``inference_mode``; bf16/fp16 autocast and channels_last on CUDA;
pinned memory). Rows are written by id into ``StoreWriter``'s partial directory and checkpointed
every few batches, so a killed run continues with the missing rows only. Images that cannot be read
(and embeddings that are not finite) are zero rows listed as failed, never a crash.

:func:`embed_items` = resume planning (:func:`_plan`) + the batch generator
(:func:`embedded_batches`) + the sink (:class:`~uniret.embed.batches.RowSink`).

Parts, not a gather (:mod:`uniret.embed.store.parts`): one process writes one part of the store; under
``torchrun --nproc-per-node N -m uniret.cli embed ...`` every rank writes its own part and rank 0
only lists them in the manifest; ``--part I/N`` writes a part directory for ``uniret store merge``.
Resuming works per part: a re-run keeps finished parts and continues each unfinished one with its
missing rows.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..cluster import check_engine
from ..data.collection import ItemList
from ..errors import UniretError, UsageError
from ..guards import claim_output, in_range, is_disk_full
from ..utils import progress_bar, resolve_device
from .batches import EmbedDataset, Forward, RowSink, publish
from .model import UniversalEmbedder
from .store.layout import DTYPES, is_store
from .store.parts import EmbedJob
from .store.reader import EmbeddingStore
from .store.writer import PartWriter

logger = logging.getLogger("uniret")


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def model_info(model: UniversalEmbedder) -> dict:
    info = {"config_hash": model.config_hash(), "backbone": model.config.backbone, "dim": model.config.dim,
            "nested_dims": model.config.nested_dims}
    source_dir = getattr(model, "source_dir", None)
    if source_dir is not None:
        info["path"] = str(source_dir)
    return info


def embed_items(
    model: UniversalEmbedder,
    items,
    out: str | Path,
    batch_size: int = 64,
    workers: int = 4,
    device: str | torch.device | None = None,
    dtype: str = "float16",
    resume: bool = True,
    source: dict | None = None,
    amp: bool = True,
    checkpoint_every: int = 20,
    overwrite: bool = False,
    inputs: tuple = (),
    part: tuple[int, int] = (0, 1),
    onnx=None,
    engine: str = "local",
    ray_address: str | None = None,
    block_rows: int | None = None,
) -> EmbeddingStore:
    """Embed every item of ``items`` (an ``ItemList`` or tar shards) into the store ``out`` and return it.

    ``part=(I, N)`` embeds slice I of N into the part directory ``out`` instead (ids stay those of
    the whole input; join the parts with ``uniret store merge``). Resumes a partial run of the same
    model, items, images and options unless ``resume=False``; a finished store of exactly those is
    returned as it is ("nothing to do"). ``out`` must be new, empty or (with ``overwrite``) another
    embedding store, and never inside ``inputs`` (the data, the model). A full disk removes the
    partial store. Under torchrun every rank calls this with the same arguments, writes its own
    part, and all return the published store. ``onnx``: an ``OnnxEmbedder`` of ``model`` that runs
    the forward pass instead of torch (``--runtime onnx``).

    ``engine="ray"`` runs the job on Ray instead (:mod:`uniret.embed.ray_embed`; ``ray_address``:
    None for a local Ray of ``workers`` CPUs, ``"auto"`` or ``"HOST:PORT"`` for a cluster), writing
    one part per ``block_rows`` input rows (one per shard of tar input); ``workers`` None there
    means every CPU of the cluster.
    """
    _check_options(items, batch_size, workers, dtype, engine, ray_address, part, block_rows, device)
    out = Path(out)
    if engine == "ray":
        from .ray_embed import count_parts, embed_on_ray

        rank, world = 0, 1  # one driver; Ray runs the parts
        job = EmbedJob(out, items, model_info(model), model.config.dim, dtype, source, (0, 1), 0,
                       count_parts(items, block_rows))

        def run() -> EmbeddingStore:
            return embed_on_ray(model, job, device, batch_size, workers, resume, amp, checkpoint_every, ray_address,
                                onnx)
    else:
        rank, world, local_rank = dist_info()
        if world > 1 and not torch.distributed.is_initialized():
            # gloo only coordinates (barriers); no tensor crosses ranks.
            torch.distributed.init_process_group("gloo")
        dev = torch.device(resolve_device(device, local_rank=local_rank))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        job = EmbedJob(out, items, model_info(model), model.config.dim, dtype, source, part, rank, world)

        def run() -> EmbeddingStore:
            return _embed(model, job, dev, batch_size, workers, resume, amp, checkpoint_every, rank, world, onnx)
    done_store = job.finished() if resume else None
    if done_store is not None:
        logger.info("%s already holds these %d embeddings; nothing to do", out, done_store.count)
        return done_store
    if rank == 0 and is_store(out) and not overwrite:
        made = " made from other images, model or options (changed since?)" if resume else ""
        raise UniretError(f"{out} already holds an embedding store{made}; pass --overwrite to replace it, "
                          "or choose another --out")
    claim = claim_output(out, "embedding store", is_store, inputs, overwrite=True) if rank == 0 else nullcontext()
    with claim:
        try:
            return run()
        except BaseException as exc:
            if rank == 0 and is_disk_full(exc):
                shutil.rmtree(job.partial, ignore_errors=True)
            raise


def _embed(model: UniversalEmbedder, job: EmbedJob, dev: torch.device, batch_size: int, workers: int,
           resume: bool, amp: bool, checkpoint_every: int, rank: int, world: int, onnx=None) -> EmbeddingStore:
    """Every process embeds its part; rank 0 then lists the parts in the manifest and publishes."""
    out = job.out
    if rank == 0:
        job.prepare(restart=not resume)
    _barrier(world)
    writer = job.open_part(restart=not resume)
    if writer is None:
        logger.info("%s: part %d of %d is already embedded", out, job.k, job.parts)
    else:
        _embed_part(model, writer, dev, batch_size, workers, amp, checkpoint_every,
                    f" (rank {rank})" if world > 1 else "", onnx)
    _barrier(world)
    if rank == 0:
        store = publish(job)
    _barrier(world)
    return store if rank == 0 else EmbeddingStore(out, whole=False)


def _embed_part(model: UniversalEmbedder, writer: PartWriter, dev: torch.device, batch_size: int, workers: int,
                amp: bool, checkpoint_every: int, who: str, onnx=None) -> None:
    """Embed the rows of one part that are still missing, checkpointing every few batches."""
    rows = writer.missing_rows()
    if len(rows) < len(writer.items):
        logger.info("resuming part %d of %d%s: %d of %d rows already embedded", writer.k, writer.parts, who,
                    len(writer.items) - len(rows), len(writer.items))
    sink = RowSink(writer)
    start = time.perf_counter()
    with progress_bar(f"embedding{who}", len(rows)) as advance:
        for batch_no, (ids, vectors, ok, reasons) in enumerate(
                embedded_batches(model, writer.items, rows, dev, batch_size, workers, amp, onnx), start=1):
            sink.add(ids, vectors, ok, reasons)
            advance(len(ids))
            if batch_no % checkpoint_every == 0:
                sink.flush()
        sink.flush()
    seconds = time.perf_counter() - start
    if len(rows):
        logger.info("embedded %d images in %.1fs (%.1f images/s)%s", len(rows), seconds,
                    len(rows) / max(seconds, 1e-9), who)
    writer.finish()


def _check_options(items, batch_size: int, workers: int | None, dtype: str, engine: str = "local",
                   ray_address: str | None = None, part: tuple[int, int] = (0, 1), block_rows: int | None = None,
                   device=None) -> None:
    in_range(batch_size, "--batch-size", 1, 65_536)
    if workers is not None or engine != "ray":
        in_range(workers, "--workers", 1 if engine == "ray" else 0, 256)
    check_engine(engine, ray_address)
    if engine == "ray":
        from .ray_embed import check_device

        check_device(device)
    if engine == "ray" and tuple(part) != (0, 1):
        raise UsageError("--engine ray runs every part itself; leave out --part (it is the route without Ray)")
    if engine == "ray" and dist_info()[1] > 1:
        raise UsageError("--engine ray runs its own workers; start it once, not under torchrun")
    if block_rows is not None:
        if engine != "ray":
            raise UsageError("--block-rows sets the parts of --engine ray; add --engine ray")
        in_range(block_rows, "--block-rows", 1, 1 << 40)
    if dtype not in DTYPES:
        raise UniretError(f"--dtype must be float16 or float32, not {dtype!r}")
    if isinstance(items, ItemList) and len(items) == 0:
        raise UniretError("nothing to embed: the source has no images")


def embedded_batches(model: UniversalEmbedder, items: ItemList, ids: np.ndarray, dev: torch.device,
                     batch_size: int, workers: int, amp: bool = True, onnx=None) -> Iterator[tuple]:
    """The batch generator: ``(ids, vectors (n, D) float32, ok (n,) bool, reasons)`` for the items
    ``ids``, decoded and preprocessed (the model's eval transform) in DataLoader workers. A row is not
    ok when its image could not be read or its embedding is not finite. ``onnx``: an ``OnnxEmbedder``
    that runs the forward pass instead (the loader still preprocesses with the model's transform)."""
    forward = Forward(model, dev, amp, onnx)
    dataset = EmbedDataset(items, ids, model.transforms()[1], model.config.preprocess["input_size"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=forward.use_cuda,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
    )
    for batch_ids, x, ok, reasons in loader:
        yield (batch_ids.numpy(), *forward(x, ok.numpy().astype(bool), list(reasons)))
