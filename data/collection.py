"""UnED-style multi-domain collections: domains, splits, records and image bytes.

A collection root holds ``info/<domain>/<split>.json`` (a JSON list of records
``{"path": <relative image path>, "class_id": int | [int, ...]}``, plus any other fields of the
user's, e.g. ``url`` or ``caption``, carried as the record's ``extra``) and the images under
``images/`` (paths are relative to that image root). The original UnED download is used as is
with ``info_dir="info_files"`` and ``image_root=<where its images are>``.

Record paths are read only inside the image root (:mod:`uniret.safeio`: no ``..``, no absolute
path, no symlink leaving it, regular files of a bounded size). Storage is kept apart from decoding:
every source answers ``get_image_bytes`` and callers decode
(``uniret.data.images``). :class:`FolderCollection` reads a folder, ``uniret.data.store``'s
``LmdbCollection`` reads a packed store, and both expose the same records in the same order;
``uniret.data.sources.open_collection`` picks the right one for a path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UniretError
from ..safeio import check_contained, is_utf8_name, read_contained, read_json
from ..utils import logger, stable_hash

#: Largest class id a record may carry.
MAX_CLASS_ID = 2**31 - 1

#: Splits in their canonical order. ``index`` exists only where queries search a separate index set.
SPLITS = ("train", "val", "test", "index")

#: Field names of an item's fixed metadata and of search result rows. A record's or sample's own
#: field of one of these names is kept as ``meta_<name>`` so that it never hides the fixed one.
RESERVED_FIELDS = ("id", "path", "domain", "split", "position", "class_ids", "class_id", "rank", "score",
                   "query", "image_url")
EXTRA_PREFIX = "meta_"


def extra_fields(obj: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """A record's extra fields (every field but ``skip``), renamed away from the reserved names;
    None values are dropped (an absent field and a null one are the same)."""
    skip = set(skip)
    out = {}
    for key, value in obj.items():
        if key in skip or value is None:
            continue
        name = str(key)
        while name in RESERVED_FIELDS:
            name = EXTRA_PREFIX + name
        out[name] = value
    return out


@dataclass(frozen=True)
class Record:
    """One image of a split: its path relative to the image root, its class id(s) and the record's
    other fields (``extra``)."""

    path: str
    class_ids: tuple[int, ...]
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def class_id(self) -> int:
        """The first (for single-label data: the only) class id."""
        return self.class_ids[0]

    def to_json(self) -> dict:
        cid: int | list[int] = self.class_ids[0] if len(self.class_ids) == 1 else list(self.class_ids)
        return {"path": self.path, "class_id": cid, **self.extra}


@dataclass(frozen=True)
class Item:
    """One image with everything known about it, addressed by ``(domain, split, position)``.

    Sources that are not collections (a plain folder of images) leave domain, split and class ids
    empty. ``extra`` holds the input record's other fields (a collection record's ``url``, a
    webdataset sample's json fields); :meth:`to_json` puts them beside the fixed fields.
    """

    path: str
    domain: str | None = None
    split: str | None = None
    position: int = -1
    class_ids: tuple[int, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "domain": self.domain,
            "split": self.split,
            "position": self.position,
            "class_ids": list(self.class_ids),
            **self.extra,
        }

    @staticmethod
    def from_json(obj: dict) -> Item:
        """The inverse of :meth:`to_json` (an ``id`` beside the fields, as stores and indexes keep
        it, is not part of the item)."""
        return Item(
            path=obj["path"],
            domain=obj.get("domain"),
            split=obj.get("split"),
            position=int(obj.get("position", -1)),
            class_ids=tuple(int(c) for c in obj.get("class_ids", ())),
            extra={k: v for k, v in obj.items() if k not in RESERVED_FIELDS and v is not None},
        )


def parse_class_ids(value) -> tuple[int, ...] | None:
    """``class_id`` as a tuple of non-negative ints, or None when it is not valid."""
    values = value if isinstance(value, list) else [value]
    if not values:
        return None
    out = []
    for v in values:
        # bool is an int subclass; a JSON true is not a class id. Ids past 2**31 would make classifier
        # heads of billions of outputs (training sizes them by the largest id).
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLASS_ID:
            return None
        out.append(v)
    return tuple(out)


def load_split_file(path: Path) -> list[Record]:
    """Read one split file strictly; raise a one-line :class:`UniretError` naming the problem."""
    try:
        raw = read_json(path, "split file")
    except FileNotFoundError:
        raise UniretError(f"{path}: split file not found") from None
    except OSError as exc:
        raise UniretError(f"{path}: cannot read split file ({exc.strerror or exc})") from None
    if not isinstance(raw, list):
        raise UniretError(f"{path}: expected a JSON list of {{'path', 'class_id'}} records")
    records = []
    bad = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or "class_id" not in rec:
            bad.append(f"#{i} has no path or class_id")
        elif not is_utf8_name(rec["path"]) or not canonical_path(rec["path"]):
            bad.append(f"#{i} has a path that is empty or not UTF-8 text (a lone surrogate escape)")
        else:
            rec = dict(rec, path=canonical_path(rec["path"]))
            cids = parse_class_ids(rec["class_id"])
            if cids is None:
                bad.append(f"#{i} ({rec['path']}) has class_id {rec['class_id']!r}, not an integer in 0..{MAX_CLASS_ID}")
            else:
                records.append(Record(rec["path"], cids, extra_fields(rec, skip=("path", "class_id"))))
        if len(bad) >= 3:
            break
    if bad:
        raise UniretError(f"{path}: bad records: {'; '.join(bad)}")
    seen: set[str] = set()
    dup = sorted({r.path for r in records if r.path in seen or seen.add(r.path)})
    if dup:
        raise DuplicatePaths(path, records, dup)
    return records


class DuplicatePaths(UniretError):
    """A split that lists one image more than once (compared in canonical form): it would be embedded,
    indexed and counted as relevant twice. ``records`` lets ``data check`` go on checking the split."""

    def __init__(self, path: Path, records: list, duplicates: list[str]):
        shown = ", ".join(duplicates[:3]) + (f", ... ({len(duplicates) - 3} more)" if len(duplicates) > 3 else "")
        super().__init__(f"{path}: {len(duplicates)} duplicate paths (compared in canonical form: a/./x.png and "
                         f"a//x.png are a/x.png), e.g. {shown}; list each image once")
        self.records = records


def canonical_path(rel: str) -> str:
    """The canonical form of a record path: ``\\`` as ``/``, empty and ``.`` parts dropped
    (``a/./x.png`` and ``a//x.png`` are ``a/x.png``). ``..`` and a leading ``/`` are kept, so that
    reading refuses them (:func:`uniret.safeio.contained_path`) and the record is listed."""
    text = rel.replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    return ("/" if text.startswith("/") else "") + "/".join(parts)


def slice_bounds(n: int, k: int, parts: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of slice ``k`` of ``parts`` contiguous slices of ``n`` rows.

    Slice ``k`` of ``K`` cut again into ``W`` is exactly slices ``k*W .. k*W+W-1`` of ``K*W``, so a
    part run on several ranks writes the same rows as that many parts of a finer split.
    """
    return k * n // parts, (k + 1) * n // parts


class ItemList(Sequence):
    """A flat, picklable view of items with their image bytes, the unit that loaders consume.

    ``source`` must answer ``get_image_bytes(domain, split, position)`` (collections) or be
    None for plain files, in which case ``path`` is read from disk. ``start`` is the id of the first
    item: 0 for a whole source, the first row of a part (:meth:`part`). ``notes`` lists what the
    source skipped while listing it (e.g. corrupt tar members), ``span`` what a part holds of its
    source besides rows (e.g. ``{"shards": [first, stop, of]}``).
    """

    def __init__(self, items: list[Item], source=None, base: Path | None = None, start: int = 0,
                 notes: list[str] | None = None, span: dict | None = None):
        self.items = items
        self.source = source
        self.base = base
        self.start = start
        self.notes = notes or []
        self.span = span or {}

    def part(self, k: int, parts: int) -> ItemList:
        """Slice ``k`` of ``parts`` (:func:`slice_bounds`); its ids stay those of the whole list."""
        a, b = slice_bounds(len(self.items), k, parts)
        return ItemList(self.items[a:b], self.source, self.base, start=self.start + a, notes=self.notes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def get_image_bytes(self, i: int) -> bytes:
        """The image bytes of item ``i``; a path that leaves its folder, a FIFO, a device or an oversized
        file raises :class:`~uniret.safeio.UnsafePath` (a UniretError) instead of being read."""
        item = self.items[i]
        if self.source is not None:
            return self.source.get_image_bytes(item.domain, item.split, item.position)
        if self.base is None:
            path = Path(item.path)
            return read_contained(path.parent, path.name)
        return read_contained(self.base, item.path)

    def content_key(self) -> str:
        """A hash of the images as they are now (each file's size and modification time; for a packed
        store, the store file's): part of every fingerprint, so replacing an image invalidates
        resumable work and caches built from it."""
        if self.source is not None:
            return self.source.content_key(self.items)
        if self.base is None:
            return stable_hash([file_key(Path(it.path).parent, Path(it.path).name) for it in self.items])
        return stable_hash([file_key(self.base, it.path) for it in self.items])


class Collection:
    """Common reading API of folder and LMDB collections."""

    root: Path
    domains: list[str]

    def splits(self, domain: str) -> list[str]:
        raise NotImplementedError

    def records(self, domain: str, split: str) -> list[Record]:
        raise NotImplementedError

    def get_image_bytes(self, domain: str, split: str, position: int) -> bytes:
        raise NotImplementedError

    def content_key(self, items: Sequence[Item]) -> str:
        """See :meth:`ItemList.content_key`."""
        raise NotImplementedError

    # -- derived helpers, shared by both kinds -------------------------------------------------
    def has_split(self, domain: str, split: str) -> bool:
        return split in self.splits(domain)

    def check_domain(self, domain: str) -> None:
        if domain not in self.domains:
            raise UniretError(f"unknown domain {domain!r} in {self.root}; domains: {', '.join(self.domains)}")

    def query_index_splits(self, domain: str, split: str = "test") -> tuple[str, str]:
        """(query split, index split) of the UnED protocol: test searches ``index`` when the
        domain has one, otherwise itself (the self match is dropped at evaluation); val always
        searches itself."""
        if split == "test" and self.has_split(domain, "index"):
            return "test", "index"
        return split, split

    def items(self, domains: Iterable[str] | None = None, splits: Iterable[str] | None = None) -> ItemList:
        """All items of the chosen domains and splits, domain by domain, split by split, in file order."""
        chosen = list(domains) if domains else list(self.domains)
        for d in chosen:
            self.check_domain(d)
        wanted = list(splits) if splits else list(SPLITS)
        out: list[Item] = []
        for d in chosen:
            for s in wanted:
                if not self.has_split(d, s):
                    continue
                out.extend(
                    Item(r.path, d, s, i, r.class_ids, r.extra) for i, r in enumerate(self.records(d, s))
                )
        return ItemList(out, source=self)

    def num_classes(self, domain: str, split: str = "train") -> int:
        recs = self.records(domain, split)
        return 1 + max((max(r.class_ids) for r in recs), default=-1)


class FolderCollection(Collection):
    """A collection on disk: ``<root>/<info_dir>/<domain>/<split>.json`` + ``<image_root>``."""

    def __init__(self, root: str | Path, info_dir: str | Path = "info", image_root: str | Path | None = None):
        self.root = Path(root)
        info = Path(info_dir)
        self.info_dir = info if info.is_absolute() else self.root / info
        img = Path(image_root) if image_root is not None else Path("images")
        self.image_root = img if img.is_absolute() else self.root / img
        if not self.root.is_dir():
            raise UniretError(f"{self.root}: not a directory; give a collection root (with info/<domain>/<split>.json)")
        if not self.info_dir.is_dir():
            raise UniretError(
                f"{self.info_dir}: no split folder; a collection root needs info/<domain>/<split>.json "
                "(for the UnED download pass --info-dir info_files --image-root IMAGES); a plain image "
                "folder needs its images in class subfolders, root/<class>/<image>"
            )
        names = [p.name for p in self.info_dir.iterdir() if p.is_dir()]
        self.domains = sorted(n for n in names if is_utf8_name(n))
        skipped = [n for n in names if not is_utf8_name(n)]
        if skipped:
            logger.warning("%s: %d domain folder(s) whose names are not UTF-8 skipped, e.g. %s; rename them",
                           self.info_dir, len(skipped), ", ".join(sorted(skipped)[:3]))
        if not self.domains:
            raise UniretError(f"{self.info_dir}: no domain folders found")
        self._records: dict[tuple[str, str], list[Record]] = {}

    def split_file(self, domain: str, split: str) -> Path:
        return self.info_dir / domain / f"{split}.json"

    def splits(self, domain: str) -> list[str]:
        return [s for s in SPLITS if self.split_file(domain, s).is_file()]

    def records(self, domain: str, split: str) -> list[Record]:
        key = (domain, split)
        if key not in self._records:
            self._records[key] = load_split_file(self.split_file(domain, split))
        return self._records[key]

    def record_path(self, domain: str, split: str, position: int) -> str:
        return self.records(domain, split)[position].path

    def get_image_bytes(self, domain: str, split: str, position: int) -> bytes:
        """The record's image bytes, read only from a regular file inside the image root."""
        return read_contained(self.image_root, self.record_path(domain, split, position))

    def content_key(self, items: Sequence[Item]) -> str:
        return stable_hash([file_key(self.image_root, self.record_path(it.domain, it.split, it.position))
                            for it in items])


def file_key(root: Path, rel: str) -> list:
    """(size, modification time) of a record's image file, or why it cannot be read."""
    try:
        st = check_contained(root, rel)
    except UniretError as exc:
        return [rel, str(exc)]
    return [rel, st.st_size, st.st_mtime_ns]
