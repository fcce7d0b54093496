"""Writing stores: one part at a time, resumably, and a manifest over the parts.

:class:`PartWriter` writes one part (slice ``k`` of ``K`` of the source, see
:mod:`uniret.embed.store`) into ``<part>.partial`` (:class:`uniret.utils.PartialDir`, keyed by the
part's fingerprint): ``embeddings.npy`` and ``done.npy`` (a bool per row) are memory-mapped, so a
checkpoint flushes the vectors, then marks their rows done, and costs no rewrite of either file;
a killed run continues with the rows still missing. :meth:`PartWriter.finish` writes the
metadata (Parquet) and ``part.json`` and publishes the part with one rename.

:func:`write_manifest` lists finished parts in a store's manifest (every ``torchrun`` rank and every
``--part`` run writes parts; one process writes the manifest). :class:`StoreWriter` and
:func:`write_store` make a whole one-part store (evaluation cache, tests, arrays computed elsewhere).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from ...data.collection import Item, ItemList
from ...errors import UniretError
from ...utils import PartialDir, atomic_write_json, read_json, stable_hash
from . import metadata
from .layout import DTYPES, FORMAT, PART_FORMAT, check_tiling, part_name, store_fingerprint
from .reader import EmbeddingStore


def allocate(path: Path) -> None:
    """Reserve the disk blocks of a file that is written through a memory map: without them, a full
    disk kills the writer with SIGBUS; with them, it is an ENOSPC error here, before any work."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without it
            raise
    finally:
        os.close(fd)


def part_fingerprint(items: ItemList, k: int, parts: int, dim: int, dtype: str, header: dict) -> dict:
    """What one part's vectors depend on: its slice, its items, and the job's model, vector size/type
    and source identity (``header``: model hash, source_key)."""
    return {"format": PART_FORMAT, "slice": [k, parts], "start": items.start, "count": len(items), "dim": int(dim),
            "dtype": dtype, "model": header.get("model_hash"), "source_key": header.get("source_key"),
            "items": stable_hash([it.to_json() for it in items])}


def finished_part(part_dir: Path, fingerprint: dict) -> dict | None:
    """The manifest entry of the finished part at ``part_dir`` when it has this fingerprint."""
    try:
        info = read_json(part_dir / "part.json")
    except (OSError, ValueError):
        return None
    return part_entry(info) if info.get("fingerprint") == fingerprint else None


def part_entry(info: dict) -> dict:
    """A part's line in the store manifest, from its part.json."""
    return {"name": info["name"], "slice": info["slice"], "start": info["start"], "count": info["count"],
            "failed": len(info.get("failed", {})), "notes": len(info.get("notes", [])), "span": info.get("span", {}),
            "columns": info.get("columns", [])}


class PartWriter:
    """Writes one part into ``<part_dir>.partial``; rows are 0-based within the part."""

    def __init__(self, part_dir: str | Path, items: ItemList, k: int, parts: int, dim: int, dtype: str,
                 header: dict, restart: bool = False):
        if dtype not in DTYPES:
            raise UniretError(f"--dtype must be float16 or float32, not {dtype!r}")
        self.items, self.k, self.parts, self.dim, self.dtype = items, k, parts, dim, dtype
        self.start = items.start
        self.header = header
        self.fingerprint = part_fingerprint(items, k, parts, dim, dtype, header)
        self._dir = PartialDir(part_dir, self.fingerprint, init=self._init_partial, restart=restart)
        if not self._open_partial():  # damaged leftovers of a killed run (or planted files): start over
            self._dir = PartialDir(part_dir, self.fingerprint, init=self._init_partial, restart=True)
            self._open_partial()

    def _open_partial(self) -> bool:
        self.partial = self._dir.path
        try:
            # allow_pickle stays False: an object array planted here is refused, never unpickled
            self.embeddings = np.load(self.partial / "embeddings.npy", mmap_mode="r+")
            self.done = np.load(self.partial / "done.npy", mmap_mode="r+")
            self.failed: dict[str, str] = read_json(self.partial / "failed.json")
        except (OSError, ValueError):
            return False
        n = len(self.items)
        return (self.embeddings.shape == (n, self.dim) and self.embeddings.dtype == np.dtype(self.dtype)
                and self.done.shape == (n,) and self.done.dtype == bool and isinstance(self.failed, dict))

    @property
    def resumed(self) -> bool:
        return self._dir.resumed

    def _init_partial(self, p: Path) -> None:
        n = len(self.items)
        np.lib.format.open_memmap(p / "embeddings.npy", mode="w+", dtype=self.dtype, shape=(n, self.dim)).flush()
        np.lib.format.open_memmap(p / "done.npy", mode="w+", dtype=bool, shape=(n,)).flush()
        allocate(p / "embeddings.npy")
        allocate(p / "done.npy")
        atomic_write_json(p / "failed.json", {})

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(~np.asarray(self.done))

    def write(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        self.embeddings[rows] = vectors.astype(self.dtype, copy=False)

    def mark_failed(self, row: int, reason: str) -> None:
        self.failed[str(self.start + int(row))] = reason
        self.embeddings[row] = 0

    def checkpoint(self, rows: np.ndarray) -> None:
        """Make rows durable: flush the vectors, then record them as done (in that order)."""
        self.embeddings.flush()
        self.done[rows] = True
        self.done.flush()
        atomic_write_json(self.partial / "failed.json", self.failed)

    def finish(self) -> dict:
        """Write metadata and part.json, publish the part; returns its manifest entry."""
        missing = self.missing_rows()
        if len(missing):
            raise RuntimeError(f"part incomplete: {len(missing)} rows never written (first {missing[:5].tolist()})")
        self.embeddings.flush()
        del self.embeddings, self.done
        columns = metadata.write_metadata(self.partial / "metadata.parquet", self.items.items, self.start)
        info = {"format": PART_FORMAT, "name": part_name(self.k, self.parts), "slice": [self.k, self.parts],
                "start": self.start, "count": len(self.items), "dim": self.dim, "dtype": self.dtype,
                "model": self.header.get("model_hash"), "source_key": self.header.get("source_key"),
                "total": self.header.get("total"), "span": self.items.span, "columns": columns,
                "failed": self.failed, "notes": self.items.notes, "fingerprint": self.fingerprint}
        atomic_write_json(self.partial / "part.json", info)
        for name in ("done.npy", "failed.json"):
            (self.partial / name).unlink()
        self._dir.publish()
        return part_entry(info)


def write_manifest(root: Path, entries: list[dict], dim: int, dtype: str, model: dict, source: dict,
                   source_key: str, total: int | None, fingerprint: dict) -> dict:
    """Write ``root/manifest.json`` over finished parts (their entries); returns the manifest.

    The parts must hold contiguous ids; ``complete`` (a whole store rather than a part directory)
    when their slices cover the whole source.
    """
    entries = sorted(entries, key=lambda e: (e["start"], e["slice"][0] / e["slice"][1]))
    complete = check_tiling([(e["name"], *e["slice"]) for e in entries])
    for a, b in zip(entries, entries[1:]):
        if a["start"] + a["count"] != b["start"]:
            raise UniretError(f"{a['name']} ends at id {a['start'] + a['count']} but {b['name']} starts at "
                              f"{b['start']}; the parts disagree on ids (other sources?)")
    columns = list(dict.fromkeys(c for e in entries for c in e.get("columns", [])))
    manifest = {
        "format": FORMAT, "kind": "store" if complete else "part", "complete": complete,
        "dim": int(dim), "dtype": dtype, "normalized": True,
        "start": entries[0]["start"] if entries else 0, "count": sum(e["count"] for e in entries), "total": total,
        "model": model, "source": source, "source_key": source_key, "fingerprint": fingerprint,
        "parts": entries, "columns": columns,
        "failed_count": sum(e["failed"] for e in entries), "notes_count": sum(e["notes"] for e in entries),
    }
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


class StoreWriter:
    """A whole store of one part, written into ``<out>.partial`` and published by :meth:`finish`.

    Ids are rows (``write(ids, vectors)``, ``mark_failed(id)``, ``checkpoint(ids)``); a re-run with
    the same fingerprint continues with the rows still missing (``missing_ids``), another starts over.
    """

    def __init__(self, out: str | Path, items: list[Item], dim: int, dtype: str, manifest_extra: dict,
                 fingerprint: dict | None = None, restart: bool = False):
        items = items if isinstance(items, ItemList) else ItemList(list(items))
        model = manifest_extra.get("model") or {}
        self.source = manifest_extra.get("source") or {}
        self.model, self.dim, self.dtype = model, dim, dtype
        self.fingerprint = fingerprint or store_fingerprint(items, dim, dtype, model.get("config_hash"), self.source)
        self.header = {"model_hash": model.get("config_hash"), "source_key": self.fingerprint["items"],
                       "total": len(items)}
        self._dir = PartialDir(out, self.fingerprint, restart=restart)
        self.partial = self._dir.path
        self.part = PartWriter(self.partial / "parts" / part_name(0, 1), items, 0, 1, dim, dtype, self.header, restart)

    @property
    def done(self) -> np.ndarray:
        return self.part.done

    @property
    def embeddings(self) -> np.ndarray:
        return self.part.embeddings

    def missing_ids(self) -> np.ndarray:
        return self.part.missing_rows()

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.part.write(ids, vectors)

    def mark_failed(self, idx: int, reason: str) -> None:
        self.part.mark_failed(idx, reason)

    def checkpoint(self, ids: np.ndarray) -> None:
        self.part.checkpoint(ids)

    def finish(self) -> EmbeddingStore:
        entry = self.part.finish()
        write_manifest(self.partial, [entry], self.dim, self.dtype, self.model, self.source,
                       self.header["source_key"], self.header["total"], self.fingerprint)
        return EmbeddingStore(self._dir.publish())


def write_store(out: str | Path, embeddings: np.ndarray, items: list[Item], model: dict | None = None,
                source: dict | None = None, dtype: str = "float32", failed: dict | None = None) -> EmbeddingStore:
    """Write a whole store at once (tests, training exports, arrays computed elsewhere)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
        raise ValueError(f"embeddings shape {embeddings.shape} does not match {len(items)} items")
    w = StoreWriter(out, items, embeddings.shape[1], dtype, {"model": model or {}, "source": source or {}})
    ids = np.arange(len(items))
    w.write(ids, embeddings)
    for i, reason in (failed or {}).items():
        w.mark_failed(int(i), reason)
    w.checkpoint(ids)
    return w.finish()
