"""Plain image folders with labels from their layout and metadata from a file beside the images.

The Hugging Face ``imagefolder`` / torchvision ``ImageFolder`` convention:

- ``root/<class>/<image>``: every image's class is its folder (layout ``class``); class ids are the
  sorted class names' positions (0, 1, ...), the name is kept as the ``label`` field;
- ``root/<domain>/<class>/<image>``: a domain per top folder, classes numbered per domain (layout
  ``domain-class``);
- anything else (images at the root, mixed depths): no labels (layout ``flat``).

``layout="auto"`` picks by depth: every image two levels down is ``class``, every image three levels
down ``domain-class``, else ``flat``. A ``metadata.csv`` (a ``file_name`` column, the other columns
per image) or ``metadata.jsonl`` (one ``{"file_name": ..., ...}`` object a line) in any folder adds
its fields to the images named there (``file_name`` relative to that folder); numbers in a CSV are
read as numbers, so that ``--where "price < 20"`` compares them as such.

:func:`folder_items` gives the items to embed and index (no split); :class:`LabelledFolder` is the
same folder as a collection of one ``test`` split per domain, which ``uniret eval FOLDER`` searches
against itself (every image a query, its self match dropped) and ``uniret data check`` reports.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UniretError, UsageError
from ..safeio import read_contained
from .collection import Collection, Item, ItemList, Record, extra_fields, file_key
from .images import IMAGE_EXTENSIONS, is_image_file, list_image_files

LAYOUTS = ("auto", "flat", "class", "domain-class")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
#: The field holding the class name, as in Hugging Face ``imagefolder``.
LABEL_FIELD = "label"
#: The split every image of a labelled folder is in when it is evaluated (queries search their own split).
FOLDER_SPLIT = "test"
_MAX_METADATA_BYTES = 256 << 20


@dataclass
class FolderListing:
    """What a folder holds: its images (relative POSIX paths, sorted), the layout used and, per image,
    its (domain, class name) and metadata fields."""

    root: Path
    layout: str
    files: list[str]
    labels: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    metadata: dict[str, dict] = field(default_factory=dict)

    def class_ids(self) -> dict[tuple[str | None, str], int]:
        """(domain, class name) -> class id: sorted names numbered from 0 within each domain."""
        out: dict[tuple[str | None, str], int] = {}
        for domain in sorted({d for d, _ in self.labels.values()}, key=lambda d: d or ""):
            names = sorted({c for d, c in self.labels.values() if d == domain})
            out.update({(domain, name): i for i, name in enumerate(names)})
        return out

    def items(self, split: str | None = None, default_domain: str | None = None) -> list[Item]:
        ids = self.class_ids()
        items = []
        for position, rel in enumerate(self.files):
            extra = dict(self.metadata.get(rel, {}))
            domain, class_ids = default_domain, ()
            if rel in self.labels:
                label_domain, name = self.labels[rel]
                domain = label_domain if label_domain is not None else default_domain
                class_ids = (ids[(label_domain, name)],)
                extra = {LABEL_FIELD: name, **{k: v for k, v in extra.items() if k != LABEL_FIELD}}
            items.append(Item(rel, domain, split, position, class_ids, extra))
        return items


def resolve_layout(files: Sequence[str], layout: str = "auto") -> str:
    """The layout to use: ``layout`` checked against the files, or picked by depth for ``auto``."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    depths = {rel.count("/") + 1 for rel in files}
    if layout == "auto":
        return {frozenset({2}): "class", frozenset({3}): "domain-class"}.get(frozenset(depths), "flat")
    need = {"class": 2, "domain-class": 3}.get(layout)
    if need is not None and depths != {need}:
        example = next(rel for rel in files if rel.count("/") + 1 != need)
        shape = "root/<class>/<image>" if need == 2 else "root/<domain>/<class>/<image>"
        raise UniretError(f"--layout {layout} needs every image at {shape}, but {example!r} is not")
    return layout


def list_folder(path: str | Path, layout: str = "auto") -> FolderListing:
    """List the images of a folder (recursively, sorted), their labels and metadata."""
    root = Path(path)
    if not root.is_dir():
        raise UniretError(f"{root}: no such directory")
    files = list_image_files(root)
    if not files:
        raise UniretError(f"{root}: no image files found (known endings: {', '.join(IMAGE_EXTENSIONS)})")
    chosen = resolve_layout(files, layout)
    labels: dict[str, tuple[str | None, str]] = {}
    if chosen != "flat":
        for rel in files:
            parts = rel.split("/")
            labels[rel] = (parts[0] if chosen == "domain-class" else None, parts[-2])
    return FolderListing(root, chosen, files, labels, read_metadata(root, set(files)))


def read_metadata(root: Path, files: set[str]) -> dict[str, dict]:
    """Per-image fields of every ``metadata.csv`` / ``metadata.jsonl`` under ``root`` (by relative path)."""
    out: dict[str, dict] = {}
    for name in METADATA_FILES:
        for meta_file in sorted(root.rglob(name)):
            folder = meta_file.parent.relative_to(root)
            rel_file = meta_file.relative_to(root).as_posix()
            text = read_contained(root, rel_file, max_bytes=_MAX_METADATA_BYTES).decode("utf-8-sig", "replace")
            rows = _csv_rows(text, rel_file) if name.endswith(".csv") else _jsonl_rows(text, rel_file)
            for line, row in rows:
                target = row.get("file_name")
                if not isinstance(target, str) or not target:
                    raise UniretError(f"{meta_file}: row {line} has no file_name (the image path relative to "
                                      "this file's folder)")
                rel = (folder / target).as_posix() if str(folder) != "." else Path(target).as_posix()
                if rel in files:
                    out.setdefault(rel, {}).update(extra_fields(row, skip=("file_name",)))
    return out


def _csv_rows(text: str, where: str):
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "file_name" not in reader.fieldnames:
        raise UniretError(f"{where}: needs a header row with a file_name column")
    for line, row in enumerate(reader, start=2):
        yield line, {k: _typed(v) for k, v in row.items() if k is not None and v not in (None, "")}


def _typed(text: str):
    """A CSV cell as an int, a float or the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _jsonl_rows(text: str, where: str):
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UniretError(f"{where}: line {line} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UniretError(f"{where}: line {line} is not a JSON object")
        yield line, row


def folder_items(path: str | Path, layout: str = "auto") -> ItemList:
    """The items of an image folder with their labels and metadata (see the module docstring)."""
    listing = list_folder(path, layout)
    return ItemList(listing.items(), base=listing.root)


def has_class_folders(path: Path) -> bool:
    """Whether some image lies in a subfolder (a folder :class:`LabelledFolder` may read)."""
    return any(is_image_file(f) for sub in path.iterdir() if sub.is_dir() for f in sub.rglob("*"))


class LabelledFolder(Collection):
    """A labelled image folder as a collection: one ``test`` split per domain (class layout: one
    domain named after the folder), searched against itself by ``uniret eval``."""

    def __init__(self, root: str | Path, layout: str = "auto"):
        self.root = Path(root)
        self.listing = list_folder(self.root, layout)
        if self.listing.layout == "flat":
            raise UniretError(f"{self.root}: no class subfolders to evaluate against; put each class's images in "
                              "root/<class>/ (or root/<domain>/<class>/), or give a collection root with info/")
        self.layout = self.listing.layout
        name = self.root.resolve().name or "images"
        self._records: dict[str, list[Record]] = {}
        for item in self.listing.items(default_domain=name):
            self._records.setdefault(item.domain, []).append(Record(item.path, item.class_ids, item.extra))
        self.domains = sorted(self._records)

    def splits(self, domain: str) -> list[str]:
        return [FOLDER_SPLIT] if domain in self._records else []

    def records(self, domain: str, split: str) -> list[Record]:
        self.check_domain(domain)
        if split != FOLDER_SPLIT:
            raise UniretError(f"{self.root}: an image folder has only the {FOLDER_SPLIT!r} split (every image "
                              "is searched against the others)")
        return self._records[domain]

    def get_image_bytes(self, domain: str, split: str, position: int) -> bytes:
        return read_contained(self.root, self.records(domain, split)[position].path)

    def content_key(self, items: Sequence[Item]) -> str:
        from ..utils import stable_hash

        return stable_hash([file_key(self.root, it.path) for it in items])
