"""Entry points from a path to what it holds: :func:`open_collection` (a collection folder or a packed
store) and :func:`open_items` (the items to embed: a collection, a packed store, plain images or
webdataset tar shards).

They live here, above the modules they build from (``collection``, ``store``, ``images``), so that
none of those needs to import another to find its sibling."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import UniretError
from .collection import Collection, FolderCollection, ItemList
from .folder import LabelledFolder, folder_items, has_class_folders
from .images import image_folder_items
from .store import LmdbCollection
from .webdataset import TarShards, is_shard_spec


def is_packed_store(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def is_collection(path: Path, info_dir: str = "info") -> bool:
    return is_packed_store(path) or (path / info_dir).is_dir()


def open_collection(path: str | Path, info_dir: str | Path = "info", image_root: str | Path | None = None,
                    layout: str = "auto") -> Collection:
    """Open a collection folder, a packed LMDB store (a directory holding ``data.mdb``), or an image
    folder with class subfolders (:class:`~uniret.data.folder.LabelledFolder`: labels from ``layout``)."""
    p = Path(path)
    if not p.exists():
        raise UniretError(f"{p}: no such file or directory")
    if is_packed_store(p):
        return LmdbCollection(p)
    if (p.is_dir() and image_root is None and not (p / info_dir).is_dir() and not (p / "images").is_dir()
            and has_class_folders(p)):
        return LabelledFolder(p, layout=layout)
    return FolderCollection(p, info_dir=info_dir, image_root=image_root)


def open_items(
    path: str | Path,
    domains: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    info_dir: str = "info",
    image_root: str | None = None,
    layout: str = "auto",
) -> ItemList | TarShards:
    """Items of a collection root or packed LMDB (filtered by domain and split), of webdataset tar
    shards (``x.tar`` or a brace pattern, listed lazily: see :mod:`uniret.data.webdataset`), else of
    an image folder or file (where domain and split filters make no sense and are refused; labels
    from its subfolders by ``layout``, see :mod:`uniret.data.folder`).

    Both kinds answer ``part(k, parts)`` (slice ``k`` of ``parts``, with global ids) and ``len()``.
    """
    if is_shard_spec(str(path)):
        if domains or splits:
            raise UniretError(f"{path}: --domain/--split need a collection root or packed store, not tar shards")
        return TarShards(str(path))
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
    return folder_items(p, layout) if p.is_dir() else image_folder_items(p)
