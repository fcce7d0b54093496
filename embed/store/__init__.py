"""The embedding store: embeddings aligned with stable ids, their metadata and a manifest.

A store is a manifest plus parts; each part holds a contiguous range of ids::

    STORE/
      manifest.json                 format "uniret-embeddings/2", kind (store | part), dim, dtype, count,
                                    start, complete, total, model, source, source_key, fingerprint,
                                    parts: [{name, slice: [k, K], start, count, failed, notes, span}],
                                    columns (the extra metadata fields), failed_count
      parts/part-00000-of-00002/
        embeddings.npy              (count, dim) float16 | float32, row j = id start + j
        metadata.parquet            id, path, domain, split, position, class_ids + extra columns
                                    (:mod:`uniret.embed.store.metadata`)
        part.json                   the part's slice, ids, model, fingerprint, failed ids, notes

Part ``k`` of ``K`` holds slice ``k`` of ``K`` of the source (``ItemList.part``): one process
writes one part, ``torchrun`` ranks write one part each, ``uniret embed --part I/N`` writes
its own part directory (``kind: part``, ``complete: false``) and ``uniret store merge`` joins such
directories by hard-linking their part files under one manifest (:mod:`uniret.embed.store.merge`). Ids
are always the global row ids of the whole source.

Modules, layered in this order (no module imports one after it): :mod:`.layout` (format tags, part
names, fingerprints), :mod:`.metadata` (Parquet), :mod:`.rows`, :mod:`.reader`, :mod:`.writer`,
:mod:`.parts` (which part a process writes: ``embed --part I/N``, torchrun ranks) and :mod:`.merge`
(``uniret store merge``).

Readers (:class:`EmbeddingStore`) memory-map the parts and see one store in id order:
``store.embeddings`` is the part's ``np.memmap`` for a one-part store and otherwise a
:class:`RowsView` (rows gathered from the parts on indexing; ``np.asarray`` concatenates them all,
which only a small store should do). Code that must scale iterates ``store.parts`` (each a
:class:`StorePart`: ``start``, ``count``, memory-mapped ``embeddings``, ``iter_items()``,
``read_rows(a, b)``), or uses ``store.iter_items()`` / ``store.read_rows(a, b)``, and never
touches ``store.items`` (a list of every item) or ``np.asarray(store.embeddings)``.

Stores of format ``uniret-embeddings/1`` (one ``embeddings.npy`` + ``metadata.jsonl``, failed
ids in the manifest) open as a store of one part. Rows of images that could not be read are zero
and listed as failed (``store.failed``); they keep their id so that ids never shift.

:func:`store_fingerprint` says what a store's vectors depend on. Partial directories, a finished
store (``manifest["fingerprint"]``) and the evaluation cache are reused only when it is equal.
"""

from __future__ import annotations

from .layout import (
    DTYPES,
    FORMAT,
    FORMAT_V1,
    NONFINITE,
    PART_FILES,
    PART_FORMAT,
    check_tiling,
    is_store,
    part_name,
    source_key,
    store_fingerprint,
)
from .merge import merge_parts
from .parts import EmbedJob, parse_part
from .reader import EmbeddingStore, LegacyPart, StorePart, open_finished
from .rows import RowsView
from .writer import PartWriter, StoreWriter, allocate, write_manifest, write_store

__all__ = [
    "DTYPES", "FORMAT", "FORMAT_V1", "NONFINITE", "PART_FILES", "PART_FORMAT", "EmbedJob", "EmbeddingStore",
    "LegacyPart", "PartWriter", "RowsView", "StorePart", "StoreWriter", "allocate", "check_tiling", "is_store",
    "merge_parts", "open_finished", "parse_part", "part_name", "source_key", "store_fingerprint", "write_manifest",
    "write_store",
]
