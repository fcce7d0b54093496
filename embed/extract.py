"""Extraction: images of an ItemList -> an embedding store, fast, resumable, on 1..N processes.

The loader carries each item's id (its row) through DataLoader workers that read bytes, decode
(``uniret.data.images.decode_image``) and preprocess; the main process only moves batches to the
device and runs the model (``inference_mode``; bf16/fp16 autocast and channels_last on CUDA;
pinned memory). Rows are written by id into ``StoreWriter``'s partial directory and checkpointed
every few batches, so a killed run continues with the missing rows only. Images that cannot be read
(and embeddings that are not finite) are zero rows listed as failed, never a crash.

:func:`embed_items` = resume planning (:func:`_plan`) + the batch generator
(:func:`embedded_batches`) + the sink (:class:`_RowSink`).

Several processes (``torchrun --nproc-per-node N -m uniret.cli embed ...``): each rank embeds a
contiguous share of the missing ids and writes chunk files ``<out>.partial/chunks/r<rank>-<seq>.npz``;
rank 0 folds them into the store (also the leftovers of a killed run) and publishes the same store
one process would have written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..data.collection import ItemList
from ..data.images import decode_image
from ..errors import UniretError
from ..guards import claim_output, in_range, is_disk_full
from ..utils import progress_bar, resolve_device
from .model import UniversalEmbedder
from .store import DTYPES, NONFINITE, EmbeddingStore, StoreWriter, is_store, open_finished, store_fingerprint

logger = logging.getLogger("uniret")


class EmbedDataset(torch.utils.data.Dataset):
    """Item ``ids[j]`` -> (id, image tensor, ok, reason); unreadable images give a zero tensor."""

    def __init__(self, items: ItemList, ids: np.ndarray, transform, input_size):
        self.items = items
        self.ids = np.asarray(ids, dtype=np.int64)
        self.transform = transform
        self.input_size = tuple(int(v) for v in input_size)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int):
        i = int(self.ids[j])
        try:
            x = self.transform(decode_image(self.items.get_image_bytes(i)))
            return i, x, True, ""
        except (UniretError, OSError, KeyError) as exc:  # ImageDecodeError is a UniretError
            return i, torch.zeros(self.input_size), False, str(exc).splitlines()[0][:200]


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


def _chunk_dir(writer_partial: Path) -> Path:
    return writer_partial / "chunks"


def write_chunk(partial: Path, rank: int, seq: int, ids, vectors, failed: dict[int, str]) -> None:
    """One rank's finished rows, written atomically (temporary name + rename)."""
    d = _chunk_dir(partial)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"r{rank:03d}-{seq:06d}.npz"
    tmp = d / f".r{rank:03d}-{seq:06d}.tmp.npz"
    np.savez(tmp, ids=np.asarray(ids, dtype=np.int64), vectors=np.asarray(vectors, dtype=np.float32),
             failed=np.asarray(json.dumps({str(k): v for k, v in failed.items()})))
    os.replace(tmp, final)


def ingest_chunks(writer: StoreWriter) -> int:
    """Fold every chunk file into the writer and checkpoint; returns the number of rows taken."""
    d = _chunk_dir(writer.partial)
    files = sorted(d.glob("r*.npz")) if d.is_dir() else []
    taken = 0
    for f in files:
        with np.load(f) as z:
            ids, vectors, failed = z["ids"], z["vectors"], json.loads(str(z["failed"]))
        if len(ids):
            writer.write(ids, vectors)
        for i, reason in failed.items():
            writer.mark_failed(int(i), reason)
        writer.checkpoint(ids)
        f.unlink()
        taken += len(ids)
    return taken


def embed_items(
    model: UniversalEmbedder,
    items: ItemList,
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
) -> EmbeddingStore:
    """Embed every item into the store ``out`` (row i = item i) and return it.

    Resumes a partial run of the same model, items, images and options unless ``resume=False``; a
    finished store of exactly those is returned as it is ("nothing to do"). ``out`` must be new,
    empty or (with ``overwrite``) another embedding store, and never inside ``inputs`` (the data,
    the model). A full disk removes the partial store. Under torchrun every rank calls this with the
    same arguments; all return the published store.
    """
    _check_options(items, batch_size, workers, dtype)
    out = Path(out)
    rank, world, local_rank = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        # gloo only coordinates (barriers); no tensor crosses ranks.
        torch.distributed.init_process_group("gloo")
    dev = torch.device(resolve_device(device, local_rank=local_rank))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    item_list = list(items.items) if isinstance(items, ItemList) else list(items)
    manifest_extra = {"model": model_info(model), "source": source or {}}
    files = items.content_key() if isinstance(items, ItemList) else None
    fingerprint = store_fingerprint(item_list, model.config.dim, dtype, manifest_extra["model"]["config_hash"], source,
                                    files=files)

    done_store = open_finished(out, fingerprint) if resume else None
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
            return _embed(model, items, out, item_list, manifest_extra, fingerprint, batch_size, workers, dev,
                          dtype, resume, amp, checkpoint_every, rank, world)
        except BaseException as exc:
            if rank == 0 and is_disk_full(exc):
                shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
            raise


def _embed(model, items, out: Path, item_list: list, manifest_extra: dict, fingerprint: dict, batch_size: int,
           workers: int, dev, dtype: str, resume: bool, amp: bool, checkpoint_every: int, rank: int,
           world: int) -> EmbeddingStore:
    writer, share = _plan(out, item_list, model.config.dim, dtype, manifest_extra, fingerprint, resume, rank, world)
    sink = _RowSink(writer, out.with_name(out.name + ".partial"), rank, world)
    start = time.perf_counter()
    with progress_bar(f"embedding{f' (rank {rank})' if world > 1 else ''}", len(share)) as advance:
        for batch_no, (ids, vectors, ok, reasons) in enumerate(
                embedded_batches(model, items, share, dev, batch_size, workers, amp), start=1):
            sink.add(ids, vectors, ok, reasons)
            advance(len(ids))
            if batch_no % checkpoint_every == 0:
                sink.flush()
        sink.flush()
    seconds = time.perf_counter() - start
    if len(share):
        logger.info("embedded %d images in %.1fs (%.1f images/s)%s", len(share), seconds, len(share) / max(seconds, 1e-9),
                    f" on rank {rank}" if world > 1 else "")
    _barrier(world)
    if rank == 0:
        ingest_chunks(writer)
        store = writer.finish()
        if store.manifest.get("failed"):
            failed = store.manifest["failed"]
            first = next(iter(failed.items()))
            logger.warning("%d unreadable images skipped (zero rows, listed in the manifest); e.g. id %s: %s",
                           len(failed), first[0], first[1])
    _barrier(world)
    return store if rank == 0 else EmbeddingStore(out)


def _check_options(items, batch_size: int, workers: int, dtype: str) -> None:
    in_range(batch_size, "--batch-size", 1, 65_536)
    in_range(workers, "--workers", 0, 256)
    if dtype not in DTYPES:
        raise UniretError(f"--dtype must be float16 or float32, not {dtype!r}")
    if len(items) == 0:
        raise UniretError("nothing to embed: the source has no images")


def _plan(out: Path, item_list: list, dim: int, dtype: str, manifest_extra: dict, fingerprint: dict,
          resume: bool, rank: int, world: int) -> tuple[StoreWriter | None, np.ndarray]:
    """Resume planning: rank 0 opens (or resumes) the partial store and folds in the chunks a killed
    run left; then every rank takes its contiguous share of the ids still missing."""
    writer = None
    if rank == 0:
        writer = StoreWriter(out, item_list, dim, dtype, manifest_extra, fingerprint=fingerprint, restart=not resume)
        leftover = ingest_chunks(writer)
        already = int(writer.done.sum())
        if already:
            logger.info("resuming %s: %d of %d rows already embedded%s", out, already, len(item_list),
                        f" ({leftover} from unfinished chunks)" if leftover else "")
    _barrier(world)
    done = writer.done if writer is not None else np.load(out.with_name(out.name + ".partial") / "done.npy")
    missing = np.flatnonzero(~done)
    return writer, (np.array_split(missing, world)[rank] if world > 1 else missing)


def embedded_batches(model: UniversalEmbedder, items: ItemList, ids: np.ndarray, dev: torch.device,
                     batch_size: int, workers: int, amp: bool = True) -> Iterator[tuple]:
    """The batch generator: ``(ids, vectors (n, D) float32, ok (n,) bool, reasons)`` for the items
    ``ids``, decoded and preprocessed (the model's eval transform) in DataLoader workers. A row is not
    ok when its image could not be read or its embedding is not finite."""
    model = model.to(dev).eval()
    use_cuda = dev.type == "cuda"
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast("cuda", dtype=amp_dtype) if (use_cuda and amp) else nullcontext()
    dataset = EmbedDataset(items, ids, model.transforms()[1], model.config.preprocess["input_size"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=use_cuda,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
    )
    with torch.inference_mode():
        for batch_ids, x, ok, reasons in loader:
            x = x.to(dev, non_blocking=True)
            if use_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                z = model(x)
            vectors = z.float().cpu().numpy()
            ok = ok.numpy().astype(bool)
            reasons = list(reasons)
            finite = np.isfinite(vectors).all(axis=1)
            for j in np.flatnonzero(ok & ~finite):
                reasons[j] = NONFINITE
            yield batch_ids.numpy(), vectors, ok & finite, reasons


class _RowSink:
    """Where embedded rows go: straight into the writer (one process) or into chunk files (several
    ranks, folded in by rank 0). :meth:`flush` makes the rows added so far durable."""

    def __init__(self, writer: StoreWriter | None, partial: Path, rank: int, world: int):
        self.writer, self.partial, self.rank, self.world = writer, partial, rank, world
        self.seq = int(time.time() * 1000) % 10**6  # distinct chunk names across resumed runs
        self.ids: list[np.ndarray] = []
        self.vectors: list[np.ndarray] = []
        self.failed: dict[int, str] = {}

    def add(self, ids: np.ndarray, vectors: np.ndarray, ok: np.ndarray, reasons: list[str]) -> None:
        failed = {int(i): r for i, r, good in zip(ids, reasons, ok) if not good}
        if self.world == 1:
            self.writer.write(ids[ok], vectors[ok])
            for i, r in failed.items():
                self.writer.mark_failed(i, r)
        else:
            vectors[~ok] = 0
            self.vectors.append(vectors)
            self.failed.update(failed)
        self.ids.append(ids)

    def flush(self) -> None:
        if not self.ids:
            return
        ids = np.concatenate(self.ids)
        if self.world == 1:
            self.writer.checkpoint(ids)
        else:
            write_chunk(self.partial, self.rank, self.seq, ids, np.concatenate(self.vectors), self.failed)
            self.seq += 1
        self.ids.clear()
        self.vectors.clear()
        self.failed.clear()
