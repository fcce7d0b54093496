"""One entry point from a path to the items to embed: a collection, a packed store or plain images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import UniretError
from .collection import ItemList, open_collection
from .images import image_folder_items


def is_collection(path: Path, info_dir: str = "info") -> bool:
    return (path / "data.mdb").is_file() or (path / info_dir).is_dir()


def open_items(
    path: str | Path,
    domains: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    info_dir: str = "info",
    image_root: str | None = None,
) -> ItemList:
    """Items of a collection root or packed LMDB (filtered by domain and split), else of an image
    folder or file (where domain and split filters make no sense and are refused)."""
    p = Path(path)
    if not p.exists():
        raise UniretError(f"{p}: no such file or directory")
    if p.is_dir() and is_collection(p, info_dir):
        coll = open_collection(p, info_dir=info_dir, image_root=image_root)
        items = coll.items(domains, splits)
        if len(items) == 0:
            raise UniretError(
                f"{p}: no images for domains={list(domains or [])} splits={list(splits or [])}; "
                "check --domain/--split against `uniret data check`"
            )
        return items
    if domains or splits:
        raise UniretError(f"{p}: --domain/--split need a collection root or packed store, not a plain image folder")
    return image_folder_items(p)
