"""Reading stores: :class:`EmbeddingStore` sees the parts of a store (see :mod:`uniret.embed.store`
for the format) as one store in id order, memory-mapped; format-1 stores open as one part.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import numpy as np

from ...data.collection import Item
from ...errors import UniretError
from ...safeio import load_npy, parse_json
from ...utils import read_json
from . import metadata
from .layout import FORMAT, FORMAT_V1
from .rows import RowsView

_PART_NAME = re.compile(r"part-\d+-of-\d+")  # a part's directory name: never a path leaving the store


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_failed(failed, start: int, stop: int) -> bool:
    return isinstance(failed, dict) and all(str(k).isdigit() and start <= int(k) < stop for k in failed)


def _valid_entry(e) -> bool:
    """A manifest's part line: a safe name, ids as counts, a slice k of K."""
    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not _PART_NAME.fullmatch(e["name"]):
        return False
    sl = e.get("slice")
    return (_count(e.get("start")) and _count(e.get("count")) and isinstance(sl, list) and len(sl) == 2
            and all(_count(v) for v in sl) and sl[0] < sl[1])


class StorePart:
    """One part: ids ``start .. start + count - 1``, its vectors memory-mapped, its metadata streamed."""

    def __init__(self, path: Path, entry: dict, dim: int, dtype: str):
        self.path = path
        self.entry = entry  # its line in the store's manifest
        self.name = entry["name"]
        self.slice = tuple(entry.get("slice") or (0, 1))
        self.start = int(entry["start"])
        self.count = int(entry["count"])
        self.dim, self.dtype = dim, dtype

    @property
    def stop(self) -> int:
        return self.start + self.count

    def file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise UniretError(f"{path}: missing part file; the store is incomplete, re-embed or re-merge it")
        return path

    @cached_property
    def info(self) -> dict:
        try:
            info = read_json(self.file("part.json"))
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise UniretError(f"{self.path}/part.json: unreadable ({' '.join(str(exc).split())[:120]}); "
                              "re-embed this part") from None
        if not isinstance(info, dict) or not _valid_failed(info.get("failed", {}), self.start, self.stop) \
                or not isinstance(info.get("notes", []), list):
            raise UniretError(f"{self.path}/part.json: damaged (failed ids or notes); re-embed this part")
        return info

    @cached_property
    def embeddings(self) -> np.ndarray:
        """(count, dim) memory-mapped, read-only; row j = id start + j."""
        arr = load_npy(self.file("embeddings.npy"), mmap=True, kinds="f", what="embedding store")
        if arr.shape != (self.count, self.dim) or arr.dtype != np.dtype(self.dtype):
            raise UniretError(f"{self.path}: embeddings are {arr.shape} {arr.dtype}, the manifest says "
                              f"{(self.count, self.dim)} {self.dtype}; re-embed this part")
        return arr

    @property
    def failed(self) -> dict[str, str]:
        return self.info.get("failed", {})

    @property
    def notes(self) -> list[str]:
        return self.info.get("notes", [])

    def iter_items(self) -> Iterator[tuple[int, Item]]:
        return metadata.iter_items(self.file("metadata.parquet"), self.start, self.count)

    def read_rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` of this part (0-based within it) as float32, read from the file with plain
        reads rather than through the memory map, whose pages would stay in the reader's RSS."""
        arr = self.embeddings
        row_bytes = self.dim * arr.dtype.itemsize
        with open(arr.filename, "rb") as f:
            f.seek(arr.offset + a * row_bytes)
            out = np.fromfile(f, dtype=arr.dtype, count=(b - a) * self.dim)
        if len(out) != (b - a) * self.dim:
            raise UniretError(f"{self.path}: embeddings file is truncated (rows {a}..{b}); re-embed this part")
        return out.reshape(b - a, self.dim).astype(np.float32, copy=False)


class LegacyPart(StorePart):
    """The single part of a format-1 store (``embeddings.npy`` + ``metadata.jsonl`` at its top)."""

    def __init__(self, path: Path, manifest: dict):
        super().__init__(path, {"name": ".", "start": 0, "count": manifest["count"]}, int(manifest["dim"]),
                         manifest.get("dtype", "float16"))
        self.info = {"failed": manifest.get("failed", {}), "notes": []}

    def iter_items(self) -> Iterator[tuple[int, Item]]:
        n = 0
        with open(self.file("metadata.jsonl")) as f:
            for n, line in enumerate(f, start=1):
                try:
                    item = Item.from_json(parse_json(line, "line"))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:  # not JSON, or not an item
                    raise UniretError(f"{self.path / 'metadata.jsonl'}: damaged line {n} "
                                      f"({' '.join(str(exc).split())[:80]}); re-embed the store") from None
                yield n - 1, item
        if n != self.count:
            raise UniretError(f"{self.path}: metadata has {n} rows, manifest says {self.count}")


class EmbeddingStore:
    """Read access to a finished store (format 2, or a format-1 store as one part).

    ``EmbeddingStore(path)`` opens a whole store. A part directory of ``uniret embed --part I/N``
    (ids ``start ..`` of a larger source) opens only with ``whole=False``; then row ``j`` of
    ``embeddings`` is id ``start + j``.
    """

    def __init__(self, path: str | Path, whole: bool = True):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise UniretError(f"{self.path}: not an embedding store (no manifest.json); make one with `uniret embed`")
        try:
            self.manifest: dict = read_json(mf)
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise UniretError(f"{mf}: unreadable manifest ({' '.join(str(exc).split())[:120]})") from None
        fmt = self.manifest.get("format") if isinstance(self.manifest, dict) else None
        if fmt not in (FORMAT, FORMAT_V1):
            raise UniretError(f"{mf}: unknown store format {fmt!r} (expected {FORMAT})")
        self._check_manifest(mf)
        if fmt == FORMAT_V1:
            self.parts: list[StorePart] = [LegacyPart(self.path, self.manifest)]
        elif fmt == FORMAT:
            self.parts = [StorePart(self.path / "parts" / e["name"], e, self.dim, self.dtype)
                          for e in sorted(self.manifest["parts"], key=lambda e: (e["start"], Fraction(*e["slice"])))]
        if whole and not self.manifest.get("complete", True):
            raise UniretError(f"{self.path} holds only part of a store (ids {self.start}..{self.start + self.count - 1}); "
                              "join the parts with `uniret store merge PART_DIR... --out STORE`")

    def _check_manifest(self, mf: Path) -> None:
        """Refuse a damaged or tampered manifest with one line (not a traceback later)."""
        m = self.manifest
        ok = _count(m.get("dim")) and m["dim"] > 0 and _count(m.get("count")) and _count(m.get("start", 0))
        if ok and m["format"] == FORMAT_V1:
            ok = _valid_failed(m.get("failed", {}), 0, m["count"])
        elif ok:
            parts = m.get("parts")
            ok = (isinstance(parts, list) and all(_valid_entry(e) for e in parts)
                  and sum(e["count"] for e in parts) == m["count"] and m.get("dtype") in ("float16", "float32"))
        if not ok:
            raise UniretError(f"{mf}: damaged manifest (dim, count, parts or failed ids); re-embed the store")

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        return self.manifest.get("dtype", "float16")

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def start(self) -> int:
        """The first id held: 0 for a store, the first row of its slice for a part directory."""
        return int(self.manifest.get("start", 0))

    def __len__(self) -> int:
        return self.count

    @property
    def model_hash(self) -> str | None:
        return (self.manifest.get("model") or {}).get("config_hash")

    @property
    def fingerprint(self) -> dict | None:
        """The :func:`store_fingerprint` it was written with (None for stores older than it)."""
        return self.manifest.get("fingerprint")

    @property
    def columns(self) -> list[str]:
        """The extra metadata fields its items carry (beyond id, path, domain, split, position, class_ids)."""
        return list(self.manifest.get("columns", []))

    @cached_property
    def embeddings(self) -> np.ndarray | RowsView:
        """(count, dim), row i = id start + i: the part's memmap when there is one part, else a
        :class:`RowsView` over the parts' memmaps."""
        return self.parts[0].embeddings if len(self.parts) == 1 else RowsView(self.parts)

    def iter_items(self) -> Iterator[tuple[int, Item]]:
        """(id, Item) of every row in id order, streamed part by part."""
        for part in self.parts:
            yield from part.iter_items()

    @cached_property
    def items(self) -> list[Item]:
        """Metadata of every row, in id order (all in memory: large stores use :meth:`iter_items`)."""
        return [item for _, item in self.iter_items()]

    def read_rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` (0-based) as float32, with plain file reads across the parts."""
        pieces = [p.read_rows(max(a - s, 0), min(b - s, p.count))
                  for s, p in ((p.start - self.start, p) for p in self.parts) if s < b and s + p.count > a]
        return np.concatenate(pieces) if pieces else np.zeros((0, self.dim), np.float32)

    @cached_property
    def failed(self) -> dict[str, str]:
        """Ids (as strings) of unreadable images -> why; their rows are zero."""
        out: dict[str, str] = {}
        for part in self.parts:
            out.update(part.failed)
        return out

    @cached_property
    def notes(self) -> list[str]:
        """What the source skipped while being listed (e.g. corrupt tar members)."""
        return [n for part in self.parts for n in part.notes]

    @cached_property
    def failed_ids(self) -> np.ndarray:
        return np.asarray(sorted(int(i) for i in self.failed), dtype=np.int64)

    @cached_property
    def valid_mask(self) -> np.ndarray:
        mask = np.ones(self.count, dtype=bool)
        mask[self.failed_ids - self.start] = False
        return mask

    def check_model(self, config_hash: str, what: str = "this model") -> None:
        """Refuse to mix embeddings of different models."""
        if self.model_hash != config_hash:
            raise UniretError(
                f"{self.path} was embedded by model {self.model_hash}, not by {what} ({config_hash}); "
                "re-embed with the same model or pick the matching store"
            )


def open_finished(path: str | Path, fingerprint: dict, whole: bool = True) -> EmbeddingStore | None:
    """The finished store at ``path`` when it was written with exactly this fingerprint, else None."""
    try:
        store = EmbeddingStore(path, whole=whole)
    except UniretError:
        return None
    return store if store.fingerprint == fingerprint else None
