"""Build an index directory from an embedding store, and update it (add a store, remove ids).

Every operation writes a complete new version beside the live one and swaps ``CURRENT``
(:mod:`uniret.index.layout`), so a killed build or update leaves the previous index usable.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from .. import testing
from ..errors import UniretError, UsageError
from ..guards import claim_output, in_range
from ..safeio import check_finite, settle_lmdb
from ..utils import atomic_write_json, git_commit
from . import gpu as gpu_util
from .exact import REFINE_FACTOR, exact_search, rescore
from .inputs import copy_model, is_own_index, model_to_copy, open_store
from .keys import check_lists, index_key, is_lossy, new_index, nlist_for, set_search_param, tune
from .layout import (
    FORMAT,
    MetadataDB,
    changed_content,
    check_provenance,
    current_version,
    is_index_dir,
    load_ids_vectors,
    next_version_name,
    publish_version,
    read_index,
    read_manifest,
    refuse_changed,
    writer_lock,
)

logger = logging.getLogger("uniret")

ADD_CHUNK = 262_144


def _add_vectors(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    for start in range(0, len(ids), ADD_CHUNK):
        # Round through fp16 first: the index then holds exactly the raw vectors kept beside it, so
        # exact search, reranking and the funnel's rescoring all agree.
        chunk = np.asarray(vectors[start:start + ADD_CHUNK]).astype(np.float16).astype(np.float32)
        index.add_with_ids(chunk, np.ascontiguousarray(ids[start:start + ADD_CHUNK], dtype=np.int64))


def _train(index, vectors: np.ndarray, key: str, seed: int) -> None:
    if index.is_trained:
        return
    n = len(vectors)
    check_lists(index, n, key)
    ivf_lists = nlist_for(n) if key.startswith("IVF") else 1
    # k-means needs ~39-256 points per list; 64 per list keeps CPU training to seconds at 1M.
    size = min(n, max(64 * ivf_lists, 65_536))
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False)) if size < n else np.arange(n)
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))


def _measure_recall(index, key: str, vectors: np.ndarray, ids: np.ndarray, k: int, target: float, sample: int,
                    seed: int) -> dict:
    """Tune nprobe/efSearch on ``sample`` stored vectors used as queries, against exact search."""
    n = len(ids)
    if n == 0:
        return {"param": None, "value": None, "recall": 1.0, "tried": [], "k": k, "sample": 0}
    k = min(k, n)
    rows = np.random.default_rng(seed + 1).choice(n, min(sample, n), replace=False)
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    # truth over the fp16-rounded vectors: exactly what a Flat index holds (recall 1.0)
    _, truth_rows = exact_search(queries, np.asarray(vectors).astype(np.float16).astype(np.float32), k)
    search = None
    if is_lossy(key):
        def gather(wanted):
            rows_of = np.searchsorted(ids, np.maximum(wanted, 0))
            return np.where((wanted >= 0)[:, None], np.asarray(vectors[np.minimum(rows_of, n - 1)], np.float32), 0)

        def search(q, kk):
            return rescore(q, index.search(q, kk * REFINE_FACTOR)[1], gather, kk)[1]
    result = tune(index, queries, ids[truth_rows], k, target, search=search)
    result.update(k=k, sample=len(rows), target=target)
    return result


def _write_version(root: Path, manifest: dict, index, ids: np.ndarray, vectors: np.ndarray,
                   meta_from: Path | None, new_items: tuple[np.ndarray, list] | None,
                   removed: np.ndarray | None = None) -> Path:
    """Write a complete version into ``vNNNNNN.partial``, then publish it (rename + CURRENT swap)."""
    import faiss

    partial = root / (next_version_name(root) + ".partial")
    partial.mkdir(parents=True)
    try:
        # Serialised here and written by Python, so that a full disk is an OSError (ENOSPC) with its path
        # rather than a Faiss assertion.
        with open(partial / "index.faiss", "wb") as f:
            f.write(faiss.serialize_index(gpu_util.to_cpu(index)).tobytes())
        np.save(partial / "ids.npy", ids.astype(np.int64))
        np.save(partial / "vectors.npy", vectors.astype(np.float16, copy=False))
        if meta_from is not None:
            MetadataDB(meta_from).copy_to(partial / "meta")
        db = MetadataDB(partial / "meta", write=True)
        try:
            if removed is not None and len(removed):  # first: a replaced item's key is then free for its new id
                db.delete_ids(removed.tolist())
            if new_items is not None:
                db.put_items(*new_items)
        finally:
            db.close()
        settle_lmdb(partial / "meta")
        atomic_write_json(partial / "manifest.json", manifest)
        testing.sleep_point("index")  # lets tests kill a real update before it is published
    except BaseException:
        # A failed write (a full disk, Ctrl-C) leaves the live version as it was and no half version.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return publish_version(root, partial)


def build_index(store, out, kind: str = "auto", gpu: str = "auto", gpus: int | None = None,
                max_memory: int | None = None, target_recall: float = 0.95, recall_k: int = 100,
                model_dir=None, tune_sample: int = 1000, shard: bool = False, seed: int = 0,
                overwrite: bool = False) -> Path:
    """Build ``out`` (an index directory) from an embedding store; returns the version directory.

    ``out`` is a new or empty directory, what an interrupted build left, or (with ``overwrite``) an
    index, which then gets a new version (crash-safe rebuild); never inside the store or the model.
    A failed first build leaves no directory behind.
    """
    store = open_store(store)
    root = Path(out)
    in_range(target_recall, "--target-recall", 0, 1, low_open=True)
    in_range(recall_k, "--recall-k", 1, 10_000)
    with claim_output(root, "index directory", is_own_index, inputs=[store.path, model_dir],
                      overwrite=overwrite or not is_index_dir(root)):
        created = not root.exists()
        try:
            return _build(store, root, kind, gpu, gpus, max_memory, target_recall, recall_k, model_dir,
                          tune_sample, shard, seed)
        except BaseException:
            if created:  # no half-made index under the final name
                shutil.rmtree(root, ignore_errors=True)
            raise


def _build(store, root: Path, kind: str, gpu: str, gpus: int | None, max_memory: int | None, target_recall: float,
           recall_k: int, model_dir, tune_sample: int, shard: bool, seed: int,
           row_ids: np.ndarray | None = None) -> Path:
    """``row_ids``: the index id of each store row (ascending; the Python API's own ids), else the row."""
    model_dir = model_to_copy(store, model_dir)
    use_gpu, ngpu = gpu_util.resolve(gpu, gpus)
    rows = np.flatnonzero(store.valid_mask).astype(np.int64)
    ids = rows if row_ids is None else np.asarray(row_ids, dtype=np.int64)[rows]
    vectors = store.embeddings[rows] if len(rows) < store.count else np.asarray(store.embeddings)
    if len(ids) == 0:
        raise UniretError(f"{store.path} has no usable embeddings; re-embed it")
    check_finite(vectors, f"{store.path}", ids=ids)
    key = index_key(kind, len(ids), store.dim, max_memory=max_memory, gpu=use_gpu)
    t0 = time.perf_counter()
    index = new_index(key, store.dim)
    on_gpu = use_gpu and gpu_util.gpu_capable(key)
    if use_gpu and not on_gpu:
        if gpu == "on":
            raise UsageError(f"index {key} cannot be built on a GPU (Faiss has no GPU HNSW); use --gpu auto|off")
        logger.info("index: %s is CPU only; building on the CPU", key)
    if on_gpu:
        try:
            gpu_index = gpu_util.to_gpus(index, ngpu, shard=shard)
            _train(gpu_index, vectors, key, seed)
            _add_vectors(gpu_index, vectors, ids)
            index = gpu_util.to_cpu(gpu_index)  # persisted and tuned on the CPU copy (tuning is 1k queries)
        except RuntimeError as exc:
            if gpu == "on":
                raise UniretError(f"building {key} on the GPU failed ({str(exc).strip().splitlines()[-1]})") from None
            logger.warning("index: GPU build of %s failed (%s); building on the CPU", key, exc)
            on_gpu = False
            index = new_index(key, store.dim)
    if not on_gpu:
        _train(index, vectors, key, seed)
        _add_vectors(index, vectors, ids)
    build_s = time.perf_counter() - t0
    recall = _measure_recall(index, key, vectors, ids, recall_k, target_recall, tune_sample, seed)
    with writer_lock(root, create=True):
        model_ref = copy_model(root, Path(model_dir) if model_dir is not None else None)
        manifest = {
            "format": FORMAT, "index_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(), "model": store.manifest.get("model") or {}, "model_dir": model_ref,
            "dim": store.dim, "metric": "inner_product", "normalized": bool(store.manifest.get("normalized", True)),
            "kind": kind, "key": key, "search_params": {recall["param"]: recall["value"]} if recall["param"] else {},
            "count": int(len(ids)), "next_id": int(store.count if row_ids is None else ids[-1] + 1),
            "vectors_dtype": "float16",
            "recall": recall, "built_on": f"{ngpu} GPU(s)" if on_gpu else "cpu", "build_seconds": round(build_s, 3),
            "history": [{"op": "build", "store": str(store.path.resolve()), "added": int(len(ids)),
                         "skipped_failed": int(store.count - len(ids))}],
            "images": _images_of(store, root, 0, store.count, []) if row_ids is None else [],
        }
        set_search_param(index, recall["value"])
        return _write_version(root, manifest, index, ids, vectors, None, (ids, [store.items[i] for i in rows]))


def _images_of(store, root: Path, first_id: int, stop_id: int, recorded: list) -> list:
    """The index's image sources with the store's (where ids ``[first_id, stop_id)`` come from) added,
    so that pages and the server find pictures without ``--images``."""
    from .images import source_entry

    entry = source_entry((store.manifest.get("source") or {}).get("path"), root, first_id, stop_id)
    if entry is None:
        return list(recorded)
    last = recorded[-1] if recorded else None
    if last is not None and last["absolute"] == entry["absolute"] and last["stop_id"] == first_id:
        return recorded[:-1] + [dict(last, stop_id=stop_id)]  # the same folder again: one range
    return [*recorded, entry]


def _on_disk(root: Path) -> bool:
    return bool(read_manifest(current_version(root)).get("on_disk"))


def _load_current(root: Path):
    cur = current_version(root)
    manifest = read_manifest(cur)
    index = read_index(cur / "index.faiss", manifest)
    ids, vectors = load_ids_vectors(cur, manifest)
    return cur, manifest, index, ids, vectors


def add_to_index(index_dir, store, max_memory: int | None = None, workers: int | None = None,
                 replace: bool = False) -> dict:
    """Add the items of ``store`` that the index does not hold yet (same domain, split and path are
    skipped when their content, compared by vector, is the same); new items get fresh ids after the
    largest id ever given. Items at indexed paths with other content are refused, or with
    ``replace`` their old ids removed and the new content added. Returns counts. On-disk indexes are
    updated by :func:`uniret.index.ondisk.add_ondisk` (``max_memory``, ``workers``)."""
    root = Path(index_dir)
    if _on_disk(root):
        from .ondisk.update import add_ondisk

        return add_ondisk(root, store, max_memory=max_memory, workers=workers, replace=replace)
    store = open_store(store)
    with writer_lock(root):
        cur, manifest, index, ids, vectors = _load_current(root)
        want = (manifest.get("model") or {}).get("config_hash")
        store.check_model(want, what=f"the model of index {root}")
        if store.dim != manifest["dim"]:
            raise UniretError(f"{store.path} has dim {store.dim}, index {root} has {manifest['dim']}")
        rows = np.flatnonzero(store.valid_mask)
        items = [store.items[i] for i in rows]
        old_ids = MetadataDB(cur / "meta").ids_of(items)
        present = old_ids >= 0
        changed = np.zeros(len(rows), dtype=bool)
        changed[present] = changed_content(ids, vectors, old_ids[present], store.embeddings[rows[present]])
        if changed.any() and not replace:
            refuse_changed(root, store.path, [it.path for it, c in zip(items, changed) if c])
        take = ~present | changed
        replaced = old_ids[changed]
        rows, items = rows[take], [it for it, t in zip(items, take) if t]
        new_ids = np.arange(manifest["next_id"], manifest["next_id"] + len(rows), dtype=np.int64)
        counts = {"added": int(len(rows) - len(replaced)), "replaced": int(len(replaced)),
                  "skipped_present": int(present.sum() - len(replaced)),
                  "skipped_failed": int(store.count - store.valid_mask.sum())}
        if len(rows) == 0:
            return dict(counts, count=manifest["count"], version=cur.name)
        new_vectors = np.asarray(store.embeddings[rows], dtype=np.float32)
        check_finite(new_vectors, f"{store.path}", ids=rows)
        if len(replaced):
            index, ids, vectors = _drop(index, manifest, ids, vectors, np.isin(ids, replaced))
        _add_vectors(index, new_vectors, new_ids)
        manifest = dict(manifest, count=int(len(ids) + len(rows)), next_id=int(new_ids[-1] + 1),
                        history=manifest["history"] + [{"op": "add", "store": str(store.path.resolve()), **counts}],
                        images=_images_of(store, root, int(new_ids[0]), int(new_ids[-1] + 1),
                                          manifest.get("images") or []))
        all_vectors = np.concatenate([vectors, new_vectors.astype(np.float16)])
        final = _write_version(root, manifest, index, np.concatenate([ids, new_ids]), all_vectors,
                               cur / "meta", (new_ids, items), removed=replaced)
        return dict(counts, count=manifest["count"], version=final.name)


def _drop(index, manifest: dict, ids: np.ndarray, vectors: np.ndarray, gone: np.ndarray):
    """(index, ids, vectors) without the rows ``gone``."""
    import faiss

    keep_ids, keep_vectors = ids[~gone], np.asarray(vectors[~gone])
    try:
        index.remove_ids(faiss.IDSelectorBatch(ids[gone]))
    except RuntimeError:
        # HNSW cannot remove: rebuild the graph from the raw vectors (no training needed).
        index = new_index(manifest["key"], manifest["dim"])
        _train(index, keep_vectors, manifest["key"], 0)
        _add_vectors(index, keep_vectors, keep_ids)
        set_search_param(index, next(iter(manifest["search_params"].values()), None))
    return index, keep_ids, keep_vectors


def remove_from_index(index_dir, remove_ids, made_from: dict | None = None, what: str = "the id list") -> dict:
    """Remove ids (unknown ids are counted, not an error). Returns counts. ``made_from``: the
    provenance of a ``uniret dedup`` result; it must name this index and its current version."""

    root = Path(index_dir)
    if _on_disk(root):
        from .ondisk.update import remove_ondisk

        return remove_ondisk(root, remove_ids, made_from=made_from, what=what)
    remove_ids = np.unique(np.asarray(remove_ids, dtype=np.int64))
    with writer_lock(root):
        cur = current_version(root)
        check_provenance(root, cur, read_manifest(cur), made_from, what)
        cur, manifest, index, ids, vectors = _load_current(root)
        gone = np.isin(ids, remove_ids)
        counts = {"removed": int(gone.sum()), "not_present": int(len(remove_ids) - gone.sum())}
        if not gone.any():
            return dict(counts, count=manifest["count"], version=cur.name)
        removed = ids[gone]
        index, keep_ids, keep_vectors = _drop(index, manifest, ids, vectors, gone)
        manifest = dict(manifest, count=int(len(keep_ids)),
                        history=manifest["history"] + [{"op": "remove", **counts}])
        final = _write_version(root, manifest, index, keep_ids, keep_vectors, cur / "meta", None,
                               removed=removed)
        return dict(counts, count=manifest["count"], version=final.name)
