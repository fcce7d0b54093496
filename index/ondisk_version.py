"""Writing a version of an on-disk index: inverted lists merged from shards and/or the live
version (:mod:`.ondisk`), raw vectors concatenated (:mod:`.vectors`), metadata streamed into the
LMDB, the manifest, then publication (:mod:`.layout`). Shared by ``index build --on-disk``,
``index add`` and ``index remove`` (:mod:`.ondisk_build`, :mod:`.ondisk_update`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .. import testing
from ..errors import UniretError
from ..utils import atomic_write_json
from .layout import MetadataDB, next_version_name, publish_version
from .ondisk import IVFDATA, ListSource, attach_lists, write_lists
from .shards import TRAINED, check_shard
from .vectors import RawVectors, RawVectorWriter


def new_partial(root: Path) -> Path:
    partial = root / (next_version_name(root) + ".partial")
    partial.mkdir(parents=True)
    return partial


def merge_version(root: Path, build: Path | None, plan: dict | None, before: list[tuple[ListSource, RawVectors]],
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
                            RawVectors(path / "vectors.npy")))
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
    writer = RawVectorWriter(partial / "vectors.npy", total, sources[0][1].dim)
    for _, raw in sources:
        writer.copy_from(raw, keep)
    writer.close()
    return partial, ivf_bytes


def write_meta(dest: Path, id_items, domains: list, batch: int = 10_000, reopen_every: int = 50) -> np.ndarray:
    """Put (id, Item) pairs into the LMDB at ``dest`` in batches, reopening it now and then so that
    the B-tree pages it touched leave this process's RSS. Returns each item's domain as an index
    into ``domains`` (extended with domains not seen before): the version's ``domains.npy``."""
    db, buffer, batches, codes, known = MetadataDB(dest, write=True), [], 0, [], {d: i for i, d in enumerate(domains)}
    try:
        for pair in id_items:
            buffer.append(pair)
            codes.append(known.setdefault(pair[1].domain, len(known)))
            if len(buffer) == batch:
                db.put_items(np.array([i for i, _ in buffer]), [it for _, it in buffer])
                buffer, batches = [], batches + 1
                if batches % reopen_every == 0:
                    db.close()
                    db = MetadataDB(dest, write=True)
        if buffer:
            db.put_items(np.array([i for i, _ in buffer]), [it for _, it in buffer])
    finally:
        db.close()
    domains.extend(list(known)[len(domains):])
    return np.asarray(codes, dtype=np.int32)


def copy_meta(cur: Path, partial: Path) -> None:
    """A published version's LMDB never changes: a file copy is a consistent snapshot."""
    (partial / "meta").mkdir()
    shutil.copyfile(cur / "meta" / "data.mdb", partial / "meta" / "data.mdb")


def publish(root: Path, partial: Path, manifest: dict) -> Path:
    atomic_write_json(partial / "manifest.json", manifest)
    testing.sleep_point("index")  # lets tests kill a real update before it is published
    return publish_version(root, partial)


