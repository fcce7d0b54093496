"""Collections (UnED layout), the packed LMDB image store, validation and the demo data."""

from .collection import SPLITS, Collection, FolderCollection, Item, ItemList, Record
from .sources import open_collection, open_items

__all__ = [
    "SPLITS",
    "Collection",
    "FolderCollection",
    "Item",
    "ItemList",
    "Record",
    "open_collection",
    "open_items",
]
