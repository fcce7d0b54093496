"""Where the stored images of an index's items come from: a packed LMDB store or a folder.

:func:`open_image_source` takes ``--images ROOT_OR_LMDB``: a packed store (a directory holding
``data.mdb``; images are looked up by the item's domain, split and position, and the record's path
must match), a collection root (images under ``ROOT/images``) or a plain image root.

An index remembers where its images came from (:func:`source_entry`, written by ``index build`` and
``index add`` into the manifest's ``images`` list: the path relative to the index directory when
possible, the absolute path, and the ids it gave); :func:`index_images` opens them again, so that
pages, the server and the Python API show pictures without ``--images`` (which overrides them). A
folder
lookup resolves the item's path (symlinks included) and serves it only if it is a regular file
inside the root and not larger than :data:`MAX_IMAGE_BYTES`: a stored path can never make the
server or a page read a file outside the root.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import UniretError

logger = logging.getLogger("uniret")

#: Largest stored image served or thumbnailed.
MAX_IMAGE_BYTES = 64 << 20


class ImageNotFound(UniretError):
    """The item has no image in this source (HTTP 404)."""

    http_status = 404


class FolderImages:
    """Images under a root folder, looked up by the item's relative path."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def __repr__(self) -> str:
        return f"FolderImages({str(self.root)!r})"

    def get(self, item: dict) -> bytes:
        rel = str(item.get("path") or "")
        if not rel or Path(rel).is_absolute():
            raise ImageNotFound(f"item {item.get('id')}: its path {rel!r} is not relative to the image root")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise ImageNotFound(f"item {item.get('id')}: its path {rel!r} leaves the image root")
        if not path.is_file():
            raise ImageNotFound(f"item {item.get('id')}: no image file at {rel!r} under the image root")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageNotFound(f"item {item.get('id')}: {rel!r} is over the {MAX_IMAGE_BYTES >> 20} MB limit")
        return path.read_bytes()


class LmdbImages:
    """Images of a packed store (``uniret data pack``), looked up by domain, split and position."""

    def __init__(self, root: Path):
        from ..data.store import LmdbCollection

        self.root = root
        self.collection = LmdbCollection(root)

    def __repr__(self) -> str:
        return f"LmdbImages({str(self.root)!r})"

    def get(self, item: dict) -> bytes:
        domain, split, position = item.get("domain"), item.get("split"), item.get("position")
        try:
            records = self.collection.records(domain, split)
        except UniretError:
            records = []
        if not isinstance(position, int) or not 0 <= position < len(records) or records[position].path != item.get("path"):
            raise ImageNotFound(f"item {item.get('id')}: the packed store {self.root} does not hold {item.get('path')!r}")
        return self.collection.get_image_bytes(domain, split, position)


def open_image_source(path) -> FolderImages | LmdbImages | None:
    """The image source for ``--images`` (None passes through)."""
    if path is None:
        return None
    p = Path(path)
    if (p / "data.mdb").is_file():
        return LmdbImages(p)
    if not p.is_dir():
        raise UniretError(f"--images {p}: not a folder or a packed LMDB store")
    if (p / "info").is_dir() and (p / "images").is_dir():
        return FolderImages(p / "images")
    return FolderImages(p)


def source_entry(source_path, root: Path, first_id: int, stop_id: int) -> dict | None:
    """The manifest record of where ids ``[first_id, stop_id)`` of index ``root`` have their images:
    ``path`` relative to the index directory where there is a relative path (the two can move
    together), ``absolute`` as a fallback. None for sources that give no thumbnails (tar shards)."""
    if not source_path:
        return None
    p = Path(source_path)
    if p.is_file() and p.suffix.lower() != ".tar":
        p = p.parent  # one image file: its items' paths are relative to its folder
    if not p.is_dir():
        return None
    absolute = os.path.abspath(p)
    try:
        relative = os.path.relpath(absolute, os.path.abspath(root))
    except ValueError:  # another drive (Windows)
        relative = absolute
    return {"path": relative, "absolute": absolute, "first_id": int(first_id), "stop_id": int(stop_id)}


class RecordedImages:
    """The image sources an index recorded, each serving the ids it gave (see :func:`source_entry`)."""

    def __init__(self, sources: list[tuple[int, int, object]]):
        self.sources = sources

    def __repr__(self) -> str:
        return f"RecordedImages({[repr(s) for _, _, s in self.sources]})"

    def describe(self) -> list[str]:
        """The sources as paths (for /info: no absolute server paths, only the recorded relative ones)."""
        return [getattr(s, "label", "") for _, _, s in self.sources]

    def get(self, item: dict) -> bytes:
        item_id = item.get("id")
        for first, stop, source in self.sources:
            if isinstance(item_id, int) and first <= item_id < stop:
                return source.get(item)
        raise ImageNotFound(f"item {item_id}: the index records no image source for it; pass --images")


def index_images(root: Path, manifest: dict, override=None):
    """``override`` (``--images``) when given, else the sources the index recorded (a missing one is
    one warning line, its items then have no pictures), else None."""
    if override is not None:
        return open_image_source(override)
    sources = []
    for entry in manifest.get("images") or []:
        candidates = [Path(root) / entry.get("path", ""), Path(entry.get("absolute", ""))]
        found = next((c for c in candidates if str(c) and c.is_dir()), None)
        if found is None:
            where = " ".join(f"{root} ({entry.get('path')})".splitlines())
            logger.warning("warning: the images of %s are no longer there; pass --images to show pictures", where)
            continue
        source = open_image_source(found)
        source.label = entry.get("path")
        sources.append((int(entry.get("first_id", 0)), int(entry.get("stop_id", 2**62)), source))
    return RecordedImages(sources) if sources else None
