"""Where the stored images of an index's items come from: a packed LMDB store or a folder.

:func:`open_image_source` takes ``--images ROOT_OR_LMDB``: a packed store (a directory holding
``data.mdb``; images are looked up by the item's domain, split and position, and the record's path
must match), a collection root (images under ``ROOT/images``) or a plain image root. A folder
lookup resolves the item's path (symlinks included) and serves it only if it is a regular file
inside the root and not larger than :data:`MAX_IMAGE_BYTES`: a stored path can never make the
server or a page read a file outside the root.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UniretError

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
