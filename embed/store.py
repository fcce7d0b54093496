"""The embedding store: embeddings aligned with stable ids, their metadata and a manifest.

On disk, a store is a directory::

    manifest.json     format, dim, count, dtype, normalized, model (config hash, name), source, failed ids
    embeddings.npy    (count, dim) float16 or float32, row i = id i; np.load(..., mmap_mode="r")
    metadata.jsonl    line i: {"id": i, "path", "domain", "split", "position", "class_ids"}

Rows of images that could not be read are zero and listed in ``manifest["failed"]``; they keep
their id so that ids never shift. Stores are written by :class:`StoreWriter` into ``<out>.partial``
(:class:`uniret.utils.PartialDir`) and published with one rename, so a reader never sees a
half-written store.

:func:`store_fingerprint` says what a store's vectors depend on. The partial directory of an
interrupted run, a finished store (``manifest["fingerprint"]``) and the evaluation cache are reused
only when their fingerprint equals the one asked for.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from ..data.collection import Item
from ..errors import UniretError
from ..guards import has_format
from ..safeio import load_npy
from ..utils import PartialDir, atomic_write_json, read_json, stable_hash

FORMAT = "uniret-embeddings/1"
DTYPES = ("float16", "float32")
#: The failure reason of a row whose embedding was NaN or infinite (the model, not the image, is broken).
NONFINITE = "the model gave a non-finite embedding"


def store_fingerprint(items: Sequence[Item], dim: int, dtype: str, model_hash: str | None,
                      source: dict | None = None, files: str | None = None) -> dict:
    """Everything the stored vectors depend on: the items (paths, domains, splits, positions, labels,
    in order), the model (its config hash: architecture, preprocessing, weights), the size and type
    of the vectors, where the images come from and what they are now (``files``:
    :meth:`uniret.data.ItemList.content_key`, the sizes and modification times of the image files).

    Two runs with equal fingerprints produce the same store, so one may resume or reuse the other.
    Extend it by adding keys (e.g. a hash of the image files' sizes and mtimes): older partial runs
    and stores then simply stop matching and are rebuilt.
    """
    return {
        "format": FORMAT,
        "count": len(items),
        "dim": int(dim),
        "dtype": dtype,
        "model": model_hash,
        "source": source or {},
        "items": stable_hash([it.to_json() for it in items]),
        "files": files,
    }


def is_store(path: Path) -> bool:
    """An embedding store that uniret wrote (its manifest says so)."""
    return has_format(path, "manifest.json", FORMAT.split("/")[0])


class EmbeddingStore:
    """Read access to a finished store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise UniretError(f"{self.path}: not an embedding store (no manifest.json); make one with `uniret embed`")
        try:
            self.manifest: dict = read_json(mf)
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise UniretError(f"{mf}: unreadable manifest ({' '.join(str(exc).split())[:120]})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise UniretError(f"{mf}: unknown store format {found!r} (expected {FORMAT})")
        m = self.manifest
        ints_ok = all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool) and m[k] >= 0
                      for k in ("dim", "count"))
        failed = m.get("failed", {})
        if not ints_ok or m["dim"] == 0 or not isinstance(failed, dict) or not all(
                str(k).isdigit() and int(k) < m["count"] for k in failed):
            raise UniretError(f"{mf}: damaged manifest (dim, count or failed ids); re-embed the store")

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def __len__(self) -> int:
        return self.count

    @property
    def model_hash(self) -> str | None:
        return (self.manifest.get("model") or {}).get("config_hash")

    @property
    def fingerprint(self) -> dict | None:
        """The :func:`store_fingerprint` it was written with (None for stores older than it)."""
        return self.manifest.get("fingerprint")

    @cached_property
    def embeddings(self) -> np.ndarray:
        """(count, dim) memory-mapped array; row i belongs to id i."""
        arr = load_npy(self.path / "embeddings.npy", mmap=True, kinds="f", what="embedding store")
        if arr.shape != (self.count, self.dim):
            raise UniretError(f"{self.path}: embeddings have shape {arr.shape}, manifest says {(self.count, self.dim)}")
        return arr

    @cached_property
    def items(self) -> list[Item]:
        """Metadata of every row, in id order."""
        out = []
        try:
            with open(self.path / "metadata.jsonl") as f:
                for line in f:
                    out.append(Item.from_json(json.loads(line)))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # not JSON, or not an item
            raise UniretError(f"{self.path / 'metadata.jsonl'}: damaged line {len(out) + 1} "
                              f"({' '.join(str(exc).split())[:80]}); re-embed the store") from None
        if len(out) != self.count:
            raise UniretError(f"{self.path}: metadata has {len(out)} rows, manifest says {self.count}")
        return out

    @cached_property
    def failed_ids(self) -> np.ndarray:
        return np.asarray(sorted(int(i) for i in self.manifest.get("failed", {})), dtype=np.int64)

    @cached_property
    def valid_mask(self) -> np.ndarray:
        mask = np.ones(self.count, dtype=bool)
        mask[self.failed_ids] = False
        return mask

    def check_model(self, config_hash: str, what: str = "this model") -> None:
        """Refuse to mix embeddings of different models."""
        if self.model_hash != config_hash:
            raise UniretError(
                f"{self.path} was embedded by model {self.model_hash}, not by {what} ({config_hash}); "
                "re-embed with the same model or pick the matching store"
            )


class StoreWriter:
    """Writes a store into ``<out>.partial`` and publishes it with :meth:`finish`.

    The partial directory survives a crash: ``done.npy`` (a bool per row) and the embeddings
    written so far let a re-run with the same fingerprint continue with the rows still missing;
    another fingerprint (other items, model or options) starts over.
    """

    def __init__(self, out: str | Path, items: list[Item], dim: int, dtype: str, manifest_extra: dict,
                 fingerprint: dict | None = None, restart: bool = False):
        if dtype not in DTYPES:
            raise UniretError(f"--dtype must be float16 or float32, not {dtype!r}")
        self.out = Path(out)
        self.items = items
        self.dim = dim
        self.dtype = dtype
        if fingerprint is None:
            fingerprint = store_fingerprint(items, dim, dtype, (manifest_extra.get("model") or {}).get("config_hash"),
                                            manifest_extra.get("source"))
        self.manifest = {"format": FORMAT, "dim": dim, "count": len(items), "dtype": dtype,
                         "normalized": True, **manifest_extra, "fingerprint": fingerprint}
        self._dir = PartialDir(self.out, fingerprint, init=self._init_partial, restart=restart)
        self.partial = self._dir.path
        self.embeddings = np.load(self.partial / "embeddings.npy", mmap_mode="r+")
        self.done = load_npy(self.partial / "done.npy", kinds="b", what="partial store")
        self.failed: dict[str, str] = read_json(self.partial / "failed.json")

    def _init_partial(self, p: Path) -> None:
        np.lib.format.open_memmap(p / "embeddings.npy", mode="w+", dtype=self.dtype,
                                  shape=(len(self.items), self.dim)).flush()
        allocate(p / "embeddings.npy")
        np.save(p / "done.npy", np.zeros(len(self.items), dtype=bool))
        atomic_write_json(p / "failed.json", {})

    def missing_ids(self) -> np.ndarray:
        return np.flatnonzero(~self.done)

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.embeddings[ids] = vectors.astype(self.dtype, copy=False)

    def mark_failed(self, idx: int, reason: str) -> None:
        self.failed[str(int(idx))] = reason
        self.embeddings[idx] = 0

    def checkpoint(self, ids: np.ndarray) -> None:
        """Make rows durable: flush the vectors, then record them as done (in that order)."""
        self.embeddings.flush()
        self.done[ids] = True
        tmp = self.partial / "done.tmp.npy"
        np.save(tmp, self.done)
        tmp.replace(self.partial / "done.npy")
        atomic_write_json(self.partial / "failed.json", self.failed)

    def finish(self) -> EmbeddingStore:
        missing = self.missing_ids()
        if len(missing):
            raise RuntimeError(f"store incomplete: {len(missing)} rows never written (first ids {missing[:5].tolist()})")
        self.embeddings.flush()
        del self.embeddings
        with open(self.partial / "metadata.jsonl", "w") as f:
            for i, item in enumerate(self.items):
                f.write(json.dumps({"id": i, **item.to_json()}) + "\n")
        manifest = dict(self.manifest, failed=self.failed)
        atomic_write_json(self.partial / "manifest.json", manifest)
        for name in ("done.npy", "failed.json"):
            (self.partial / name).unlink(missing_ok=True)
        return EmbeddingStore(self._dir.publish())


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


def open_finished(path: str | Path, fingerprint: dict) -> EmbeddingStore | None:
    """The finished store at ``path`` when it was written with exactly this fingerprint, else None."""
    try:
        store = EmbeddingStore(path)
    except UniretError:
        return None
    return store if store.fingerprint == fingerprint else None


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
