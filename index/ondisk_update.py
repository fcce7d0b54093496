"""``uniret index add`` and ``uniret index remove`` on an on-disk index.

``add`` encodes the store's new items into shards (:mod:`.shards`) with the live version's trained
quantizer and merges them with its lists into a new version. ``remove`` rewrites the lists into a
new version without the removed ids: Faiss can remove from on-disk lists in place, but that would
change the live version under its readers. Both leave the live version untouched until the new
one is published, as every index update does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..errors import UniretError
from .budget import check_workers, plan_memory
from .build import _open_store
from .keys import ivf_of
from .layout import MetadataDB, current_version, read_manifest, writer_lock
from .ondisk import ListSource, load_trained
from .ondisk_build import UPDATE_DIR, _budget, _encode, _ensure_plan
from .ondisk_version import copy_meta, merge_version, publish, write_meta
from .shards import iter_items
from .vectors import RawVectors


def _live(root: Path) -> tuple[Path, dict]:
    cur = current_version(root)
    return cur, read_manifest(cur)


def add_ondisk(root: Path, store, max_memory: int | None = None, workers: int | None = None) -> dict:
    """Encode the store's new items (same domain, split and path are skipped) into shards with the
    live version's quantizer and merge them with its lists into a new version."""
    store, root = _open_store(store), Path(root)
    workers, budget = check_workers(workers), _budget(max_memory)
    with writer_lock(root):
        cur, manifest = _live(root)
        store.check_model((manifest.get("model") or {}).get("config_hash"), what=f"the model of index {root}")
        if store.dim != manifest["dim"]:
            raise UniretError(f"{store.path} has dim {store.dim}, index {root} has {manifest['dim']}")
        valid = np.flatnonzero(store.valid_mask).astype(np.int64)
        present, meta, chunk = np.zeros(len(valid), dtype=bool), MetadataDB(cur / "meta"), []
        for pos, (_, item) in enumerate(iter_items(store, valid)):
            chunk.append(item)
            if len(chunk) == 100_000 or pos == len(valid) - 1:
                present[pos + 1 - len(chunk):pos + 1] = meta.present(chunk)
                chunk = []
        rows = valid[~present]
        counts = {"added": int(len(rows)), "skipped_present": int(present.sum()),
                  "skipped_failed": int(store.count - len(valid))}
        if len(rows) == 0:
            return dict(counts, count=manifest["count"], version=cur.name)
        new_ids = np.arange(manifest["next_id"], manifest["next_id"] + len(rows), dtype=np.int64)
        build, trained = root / UPDATE_DIR, load_trained(cur, manifest)
        plan = _ensure_plan(build, store, rows, new_ids, f"add:{cur.name}", manifest["key"], trained, budget,
                            workers, None, 0)
        _encode(build, store, plan, budget, workers, None)
        window = plan_memory(budget, plan["count"], plan["dim"], plan["nlist"], plan["code_size"], 1,
                             plan["shard_rows"]).window_bytes
        before = [(ListSource.of_version(cur, manifest), RawVectors(cur / "vectors.npy"))]
        partial, ivf_bytes = merge_version(root, build, plan, before, window)
        np.save(partial / "ids.npy", np.concatenate([np.load(cur / "ids.npy"), new_ids]))
        copy_meta(cur, partial)
        domains = list(manifest["on_disk"]["domains"])
        new_codes = write_meta(partial / "meta", zip(new_ids.tolist(), (it for _, it in iter_items(store, rows))), domains)
        np.save(partial / "domains.npy", np.concatenate([np.load(cur / "domains.npy"), new_codes]))
        manifest = dict(manifest, count=int(manifest["count"] + len(rows)), next_id=int(new_ids[-1] + 1),
                        on_disk=dict(manifest["on_disk"], ivfdata_bytes=ivf_bytes, domains=domains),
                        history=manifest["history"] + [{"op": "add", "store": str(store.path.resolve()), **counts}])
        final = publish(root, partial, manifest)
    shutil.rmtree(build, ignore_errors=True)
    return dict(counts, count=manifest["count"], version=final.name)


def remove_ondisk(root: Path, remove_ids: np.ndarray, max_memory: int | None = None) -> dict:
    """Remove ids: a new version whose lists, raw vectors, ids and metadata leave them out."""
    root, remove_ids = Path(root), np.unique(np.asarray(remove_ids, dtype=np.int64))
    with writer_lock(root):
        cur, manifest = _live(root)
        ids = np.load(cur / "ids.npy")
        gone = np.isin(ids, remove_ids)
        counts = {"removed": int(gone.sum()), "not_present": int(len(remove_ids) - gone.sum())}
        if not gone.any():
            return dict(counts, count=manifest["count"], version=cur.name)
        trained = load_trained(cur, manifest)
        ivf = ivf_of(trained)
        window = plan_memory(_budget(max_memory), len(ids), manifest["dim"], ivf.nlist, ivf.code_size, 1).window_bytes
        before = [(ListSource.of_version(cur, manifest), RawVectors(cur / "vectors.npy"))]
        partial, ivf_bytes = merge_version(root, None, None, before, window, drop=ids[gone], keep=~gone, trained=trained)
        np.save(partial / "ids.npy", ids[~gone])
        np.save(partial / "domains.npy", np.load(cur / "domains.npy")[~gone])
        copy_meta(cur, partial)
        db = MetadataDB(partial / "meta", write=True)
        try:
            db.delete_ids(ids[gone].tolist())
        finally:
            db.close()
        manifest = dict(manifest, count=int((~gone).sum()), on_disk=dict(manifest["on_disk"], ivfdata_bytes=ivf_bytes),
                        history=manifest["history"] + [{"op": "remove", **counts}])
        final = publish(root, partial, manifest)
    return dict(counts, count=manifest["count"], version=final.name)


