"""Writing a version of an on-disk index: inverted lists merged from shards and/or the live
version (:mod:`.lists`), raw vectors concatenated (:mod:`.vectors`), metadata streamed into the
LMDB, the manifest, then publication (:mod:`uniret.index.layout`). Shared by ``index build --on-disk``,
``index add`` and ``index remove`` (:mod:`.build`, :mod:`.update`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ... import testing
from ...errors import UniretError
from ...utils import atomic_write_json
from ..layout import MetadataDB, next_version_name, publish_version
from .lists import IVFDATA, ListSource, attach_lists, write_lists
from .shards import TRAINED, check_shard
from .vectors import ArrayWriter, MappedArray


def new_partial(root: Path) -> Path:
    partial = root / (next_version_name(root) + ".partial")
    partial.mkdir(parents=True)
    return partial


def merge_version(root: Path, build: Path | None, plan: dict | None, before: list[tuple[ListSource, MappedArray]],
                  window: int, drop: np.ndarray | None = None, keep: np.ndarray | None = None,
                  trained=None) -> tuple[Path, int]:
    """Lists and raw vectors of ``before`` (a live version) and of the plan's shards -> a new partial
    version (index.faiss, lists.ivfdata, vectors.npy); returns (partial, lists bytes)."""
    import faiss

    sources = list(before)
    if plan is not None:
        for s in range(len(plan["shards"])):
            path = check_shard(build, s, plan)
            sources.append((ListSource.of_shard(path / "ivf.faiss", plan["nlist"], plan["code_size"]),
                            MappedArray(path / "vectors.npy")))
        trained = faiss.read_index(str(build / TRAINED))
    nlist, code_size = faiss.extract_index_ivf(trained).nlist, faiss.extract_index_ivf(trained).code_size
    partial = new_partial(root)
    sizes = write_lists(partial / IVFDATA, [s for s, _ in sources], nlist, code_size, window, drop)
    ivf_bytes = (partial / IVFDATA).stat().st_size
    total = sum(len(v) for _, v in sources) if keep is None else int(keep.sum())
    if int(sizes.sum()) != total:
        raise UniretError(f"the inverted lists hold {int(sizes.sum()):,} vectors, the raw vectors {total:,}; "
                          f"the shards are inconsistent: delete {build or root} and rebuild")
    attach_lists(trained, sizes, ivf_bytes)
    faiss.write_index(trained, str(partial / "index.faiss"))
    writer = ArrayWriter(partial / "vectors.npy", (total, sources[0][1].dim), np.float16)
    for _, raw in sources:
        writer.copy_from(raw, keep)
    writer.close()
    return partial, ivf_bytes


def iter_array(values) -> Iterator[int]:
    """The ints of a 1-D array or memory map, read a block at a time."""
    for start in range(0, len(values), 1 << 20):
        yield from np.asarray(values[start:start + (1 << 20)]).tolist()


def write_meta(dest: Path, id_items, domains: list, codes: ArrayWriter, batch: int = 10_000,
               reopen_every: int = 50) -> None:
    """Put (id, Item) pairs into the LMDB at ``dest`` in batches, reopening it now and then so that
    the B-tree pages it touched leave this process's RSS; write each item's domain to ``codes`` as
    an index into ``domains`` (extended with domains not seen before): the version's domains.npy."""
    db, buffer, batches, known = MetadataDB(dest, write=True), [], 0, {d: i for i, d in enumerate(domains)}

    def flush(buffer):
        db.put_items(np.array([i for i, _ in buffer]), [it for _, it in buffer])
        codes.write(np.array([known.setdefault(it.domain, len(known)) for _, it in buffer], dtype=np.int32))

    try:
        for pair in id_items:
            buffer.append(pair)
            if len(buffer) == batch:
                flush(buffer)
                buffer, batches = [], batches + 1
                if batches % reopen_every == 0:
                    db.close()
                    db = MetadataDB(dest, write=True)
        if buffer:
            flush(buffer)
    finally:
        db.close()
    settle_meta(dest)
    domains.extend(list(known)[len(domains):])


def settle_meta(dest: Path) -> None:
    """Extend a just-written ``data.mdb`` with zeros up to the last page its header names. LMDB
    counts pages it allocated and freed within one transaction without ever writing them, so the
    file may end before that page; the reader's check (:func:`uniret.safeio.check_lmdb`) would take
    such a file for a truncated one. The added pages are free: LMDB never reads them as data."""
    import lmdb

    env = lmdb.open(str(dest), readonly=True, lock=False)
    try:
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()
    if (dest / "data.mdb").stat().st_size < need:
        os.truncate(dest / "data.mdb", need)


def copy_meta(cur: Path, partial: Path) -> None:
    """A published version's LMDB never changes: a file copy is a consistent snapshot."""
    (partial / "meta").mkdir()
    shutil.copyfile(cur / "meta" / "data.mdb", partial / "meta" / "data.mdb")


def publish(root: Path, partial: Path, manifest: dict) -> Path:
    atomic_write_json(partial / "manifest.json", manifest)
    testing.sleep_point("index")  # lets tests kill a real update before it is published
    return publish_version(root, partial)


