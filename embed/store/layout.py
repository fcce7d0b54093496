"""The store's names and identities (no reading or writing here): format tags, part names, the
fingerprint of what a store's vectors depend on, and the check that parts' slices tile a source.

See :mod:`uniret.embed.store` for the on-disk format.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from ...data.collection import Item
from ...errors import UniretError
from ...guards import has_format
from ...utils import stable_hash

FORMAT = "uniret-embeddings/2"
FORMAT_V1 = "uniret-embeddings/1"
PART_FORMAT = "uniret-embeddings-part/1"
DTYPES = ("float16", "float32")
PART_FILES = ("embeddings.npy", "metadata.parquet", "part.json")
#: The failure reason of a row whose embedding was NaN or infinite (the model, not the image, is broken).
NONFINITE = "the model gave a non-finite embedding"


def is_store(path: Path) -> bool:
    """An embedding store (or part directory) that uniret wrote: its manifest says so."""
    return has_format(path, "manifest.json", FORMAT.split("/")[0])


def part_name(k: int, parts: int) -> str:
    width = max(5, len(str(parts)))
    return f"part-{k:0{width}d}-of-{parts:0{width}d}"


def source_key(items) -> str:
    """Identity of a whole input's items, the same on every machine that holds a copy of it: a hash
    of every item's metadata, or the input's own ``key()`` (tar shards: names and sizes)."""
    key = getattr(items, "key", None)
    return key() if callable(key) else stable_hash([it.to_json() for it in items])


def store_fingerprint(items: Sequence[Item], dim: int, dtype: str, model_hash: str | None,
                      source: dict | None = None, files: str | None = None) -> dict:
    """Everything the stored vectors depend on: the items (paths, domains, splits, positions, labels,
    extra fields, in order), the model (its config hash: architecture, preprocessing, weights), the
    size and type of the vectors, where the images come from and what they are now (``files``:
    :meth:`uniret.data.ItemList.content_key`, the sizes and modification times of the image files).

    Two runs with equal fingerprints produce the same store, so one may resume or reuse the other.
    Extend it by adding keys (e.g. a hash of the image files' sizes and mtimes): older partial runs
    and stores then simply stop matching and are rebuilt.
    """
    lazy = callable(getattr(items, "key", None))  # tar shards: counted only by listing them all
    return {
        "format": FORMAT,
        "count": None if lazy else len(items),
        "dim": int(dim),
        "dtype": dtype,
        "model": model_hash,
        "source": source or {},
        "items": source_key(items),
        "files": files,
    }


def check_tiling(slices: list[tuple[str, int, int]]) -> bool:
    """Whether the slices ``(label, k, K)`` cover the whole source; overlapping ones are an error."""
    spans = sorted((Fraction(k, n), Fraction(k + 1, n), label) for label, k, n in slices)
    if not spans:
        return False
    covered = Fraction(0)
    prev = None
    for lo, hi, label in spans:
        if lo < covered:
            raise UniretError(f"{prev} and {label} overlap (both hold rows of the same slice); "
                              "give each part once")
        covered, prev = max(covered, hi), label
    return covered == 1 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[0][0] == 0
