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

from ...errors import UniretError
from ...safeio import load_npy
from ..inputs import open_store
from ..keys import ivf_of
from ..layout import (
    MetadataDB,
    changed_content,
    check_provenance,
    current_version,
    read_manifest,
    refuse_changed,
    writer_lock,
)
from .budget import check_workers, plan_memory
from .build import UPDATE_DIR, encode_planned, ensure_plan, memory_budget
from .lists import ListSource, load_trained
from .shards import iter_items, store_key
from .vectors import ArrayWriter, MappedArray
from .version import copy_meta, merge_version, publish, settle_meta, write_meta


def _live(root: Path) -> tuple[Path, dict]:
    cur = current_version(root)
    return cur, read_manifest(cur)


def add_ondisk(root: Path, store, max_memory: int | None = None, workers: int | None = None,
               replace: bool = False) -> dict:
    """Encode the store's new items (same domain, split and path are skipped when their vector is the
    same; other content there is refused, also with ``replace``: on-disk indexes remove first) into
    shards with the live version's quantizer and merge them with its lists into a new version."""
    store, root = open_store(store), Path(root)
    workers, budget = check_workers(workers), memory_budget(max_memory)
    with writer_lock(root):
        cur, manifest = _live(root)
        store.check_model((manifest.get("model") or {}).get("config_hash"), what=f"the model of index {root}")
        if store.dim != manifest["dim"]:
            raise UniretError(f"{store.path} has dim {store.dim}, index {root} has {manifest['dim']}")
        valid = np.flatnonzero(store.valid_mask).astype(np.int64)
        present, meta, chunk = np.zeros(len(valid), dtype=bool), MetadataDB(cur / "meta"), []
        live_ids, live_vectors, changed = MappedArray(cur / "ids.npy").array, MappedArray(cur / "vectors.npy").array, []
        for pos, (_, item) in enumerate(iter_items(store, valid)):
            chunk.append(item)
            if len(chunk) == 100_000 or pos == len(valid) - 1:
                block = slice(pos + 1 - len(chunk), pos + 1)
                old_ids = meta.ids_of(chunk)
                present[block] = old_ids >= 0
                hit = np.flatnonzero(old_ids >= 0)
                differs = changed_content(live_ids, live_vectors, old_ids[hit], store.embeddings[valid[block][hit]])
                changed += [chunk[i].path for i in hit[differs]]
                chunk = []
        if changed:
            refuse_changed(root, store.path, changed, on_disk=True)
        rows = valid[~present]
        counts = {"added": int(len(rows)), "replaced": 0, "skipped_present": int(present.sum()),
                  "skipped_failed": int(store.count - len(valid))}
        if len(rows) == 0:
            return dict(counts, count=manifest["count"], version=cur.name)
        new_ids = np.arange(manifest["next_id"], manifest["next_id"] + len(rows), dtype=np.int64)
        build, trained = root / UPDATE_DIR, load_trained(cur, manifest)

        def write_rows(build: Path) -> int:
            np.save(build / "rows.npy", rows)
            np.save(build / "ids.npy", new_ids)
            return len(rows)

        # which rows are new follows from the store and the live version
        fingerprint = {"op": "add", "version": cur.name, "store": store_key(store), "key": manifest["key"]}
        plan = ensure_plan(build, store, fingerprint, write_rows, manifest["key"], trained, budget, workers, None, 0)
        encode_planned(build, store, plan, budget, workers, None)
        window = plan_memory(budget, plan["count"], plan["dim"], plan["nlist"], plan["code_size"], 1,
                             plan["shard_rows"]).window_bytes
        before = [(ListSource.of_version(cur, manifest), MappedArray(cur / "vectors.npy"))]
        partial, ivf_bytes = merge_version(root, build, plan, before, window)
        total = manifest["count"] + len(rows)
        ids_out = ArrayWriter(partial / "ids.npy", (total,), np.int64)
        ids_out.copy_from(MappedArray(cur / "ids.npy"))
        ids_out.write(new_ids)
        ids_out.close()
        codes = ArrayWriter(partial / "domains.npy", (total,), np.int32)
        codes.copy_from(MappedArray(cur / "domains.npy"))
        copy_meta(cur, partial)
        domains = list(manifest["on_disk"]["domains"])
        write_meta(partial / "meta", zip(new_ids.tolist(), (it for _, it in iter_items(store, rows))), domains, codes)
        codes.close()
        manifest = dict(manifest, count=int(manifest["count"] + len(rows)), next_id=int(new_ids[-1] + 1),
                        on_disk=dict(manifest["on_disk"], ivfdata_bytes=ivf_bytes, domains=domains),
                        history=manifest["history"] + [{"op": "add", "store": str(store.path.resolve()), **counts}])
        final = publish(root, partial, manifest)
    shutil.rmtree(build, ignore_errors=True)
    return dict(counts, count=manifest["count"], version=final.name)


def remove_ondisk(root: Path, remove_ids: np.ndarray, max_memory: int | None = None, made_from: dict | None = None,
                  what: str = "the id list") -> dict:
    """Remove ids: a new version whose lists, raw vectors, ids and metadata leave them out."""
    root, remove_ids = Path(root), np.unique(np.asarray(remove_ids, dtype=np.int64))
    with writer_lock(root):
        cur, manifest = _live(root)
        check_provenance(root, cur, manifest, made_from, what)
        ids = load_npy(cur / "ids.npy", mmap=True, kinds="iu", what="index ids")
        gone = np.concatenate([np.isin(ids[s:s + (1 << 22)], remove_ids) for s in range(0, len(ids), 1 << 22)]
                              or [np.zeros(0, dtype=bool)])
        counts = {"removed": int(gone.sum()), "not_present": int(len(remove_ids) - gone.sum())}
        if not gone.any():
            return dict(counts, count=manifest["count"], version=cur.name)
        trained = load_trained(cur, manifest)
        ivf = ivf_of(trained)
        window = plan_memory(memory_budget(max_memory), len(ids), manifest["dim"], ivf.nlist, ivf.code_size, 1).window_bytes
        before = [(ListSource.of_version(cur, manifest), MappedArray(cur / "vectors.npy"))]
        dropped = np.asarray(ids[gone])
        partial, ivf_bytes = merge_version(root, None, None, before, window, drop=dropped, keep=~gone, trained=trained)
        for name, dtype in (("ids.npy", np.int64), ("domains.npy", np.int32)):
            writer = ArrayWriter(partial / name, (int((~gone).sum()),), dtype)
            writer.copy_from(MappedArray(cur / name), keep=~gone)
            writer.close()
        copy_meta(cur, partial)
        db = MetadataDB(partial / "meta", write=True)
        try:
            db.delete_ids(dropped.tolist())
        finally:
            db.close()
        settle_meta(partial / "meta")
        manifest = dict(manifest, count=int((~gone).sum()), on_disk=dict(manifest["on_disk"], ivfdata_bytes=ivf_bytes),
                        history=manifest["history"] + [{"op": "remove", **counts}])
        final = publish(root, partial, manifest)
    return dict(counts, count=manifest["count"], version=final.name)


