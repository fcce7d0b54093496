"""The Python API's write side: build an index from images, a store or an array; embed images.

::

    import uniret
    uniret.build_index("photos", "photos-index", model="my-model")    # a folder: embedded, indexed
    uniret.build_index(vectors, "vec-index", ids=ids, metadata=rows)  # an (n, d) array you have
    index = uniret.open_index("photos-index")
    index.add("more-photos"); index.remove([3, 5])
    vectors = uniret.embed_images(["a.jpg", "b.jpg"], model="my-model")  # (2, d) float32

The same code paths as the CLI (``uniret index build|add|remove``): crash-safe versions, the model
copy, the recorded image source.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UniretError, UsageError


def _is_array(source) -> bool:
    return isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not isinstance(source, (str, Path)))


def build_index(source, out, model=None, ids=None, metadata=None, kind: str = "auto", overwrite: bool = False,
                layout: str = "auto", gpu: str = "auto", **options) -> Path:
    """Build the index ``out`` from ``source`` and return its directory.

    ``source``: an image folder (labels from class subfolders), a collection root, a packed store or
    webdataset shards (embedded with ``model``, a model directory, or the default model); an
    embedding store (``uniret embed``); or an ``(n, d)`` array of embeddings, with optional ``ids``
    (unique non-negative integers; default ``0..n-1``) and ``metadata`` (one dict per row: any
    fields, ``path`` and ``domain`` included; filterable with ``where=``). ``model`` with an array
    names the model that made it (copied into the index, so that image queries work).
    """
    from .from_images import build_from_images, is_store_path

    if _is_array(source):
        index_array(source, out, ids=ids, metadata=metadata, model=model, kind=kind, overwrite=overwrite,
                    gpu=gpu, **options)
    elif ids is not None or metadata is not None:
        raise UsageError("ids= and metadata= go with an array of embeddings; a folder or store has its own")
    elif is_store_path(source):
        from .build import build_index as build_from_store

        build_from_store(source, out, kind=kind, model_dir=model, overwrite=overwrite, gpu=gpu, **options)
    else:
        build_from_images(source, out, model=model, layout=layout, kind=kind, overwrite=overwrite, gpu=gpu,
                          **options)
    return Path(out)


def _items(n: int, ids: np.ndarray, metadata) -> list:
    from ..data.collection import Item, extra_fields

    if metadata is None:
        metadata = [{}] * n
    metadata = list(metadata)
    if len(metadata) != n:
        raise UsageError(f"metadata has {len(metadata)} rows for {n} vectors; give one dict per row")
    items = []
    for i, row in zip(ids.tolist(), metadata):
        if not isinstance(row, dict):
            raise UsageError(f"metadata row of id {i} is {type(row).__name__}, not a dict")
        path = row.get("path")
        items.append(Item(str(path) if path is not None else str(i), row.get("domain"), row.get("split"), i,
                          tuple(int(c) for c in row.get("class_ids", ())),
                          extra_fields(row, skip=("path", "domain", "split", "class_ids", "position", "id"))))
    return items


def _check_ids(ids, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"ids: expected {n} integers, got an array of shape {ids.shape} ({ids.dtype})")
    if n and (ids.min() < 0 or len(np.unique(ids)) != n):
        raise UsageError("ids must be unique non-negative integers")
    return ids.astype(np.int64)


def _model_hash(model) -> str | None:
    if model is None:
        return None
    from .inputs import model_hash_of_dir

    return model_hash_of_dir(Path(model))


def _array_store(vectors, ids, metadata, model, work: Path):
    """A store of the rows sorted by id (an index keeps its ids ascending) and the sorted ids."""
    from ..embed.store import write_store
    from ..safeio import check_finite

    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise UsageError(f"vectors: expected an (n, d) array with n, d >= 1, got shape {vectors.shape}")
    ids = _check_ids(ids, len(vectors))
    check_finite(vectors, "vectors", ids=ids)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)  # the index's metric is cosine
    order = np.argsort(ids, kind="stable")
    items = _items(len(ids), ids, metadata)
    store = write_store(work / "store", vectors[order], [items[i] for i in order],
                        model={"config_hash": _model_hash(model)})
    return store, ids[order]


def index_array(vectors, out, ids=None, metadata=None, model=None, kind: str = "auto", overwrite: bool = False,
                gpu: str = "auto", **options) -> Path:
    """Index an ``(n, d)`` array (see :func:`build_index`); returns the version directory."""
    from ..guards import claim_output
    from .build import _build
    from .inputs import is_own_index
    from .layout import is_index_dir

    root = Path(out)
    with claim_output(root, "index directory", is_own_index, inputs=[model],
                      overwrite=overwrite or not is_index_dir(root)):
        created = not root.exists()
        work = Path(tempfile.mkdtemp(prefix=".uniret-array-", dir=os.path.dirname(os.path.abspath(root))))
        try:
            store, sorted_ids = _array_store(vectors, ids, metadata, model, work)
            root.mkdir(parents=True, exist_ok=True)
            return _build(store, root, kind, gpu, options.get("gpus"), options.get("max_memory"),
                          options.get("target_recall", 0.95), options.get("recall_k", 100), model, 1000, False, 0,
                          row_ids=sorted_ids)
        except BaseException:
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)


def add_to(index_dir, source, model=None, metadata=None, layout: str = "auto", **options) -> dict:
    """Add images (a folder, ...), a store, or an ``(n, d)`` array (+ ``metadata``) to an index;
    returns the counts and the new ``ids`` (given after the largest id so far)."""
    from .build import add_to_index
    from .from_images import add_images, is_store_path
    from .layout import current_version, read_manifest

    root = Path(index_dir)
    before = read_manifest(current_version(root))["next_id"]
    if _is_array(source):
        if model is None:
            model_hash = (read_manifest(current_version(root)).get("model") or {}).get("config_hash")
        else:
            model_hash = _model_hash(model)
        work = Path(tempfile.mkdtemp(prefix=".uniret-array-", dir=os.path.dirname(os.path.abspath(root))))
        try:
            from ..embed.store import write_store

            vectors = np.asarray(source, dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[0] == 0:
                raise UsageError(f"vectors: expected an (n, d) array, got shape {vectors.shape}")
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            items = _items(len(vectors), np.arange(len(vectors)) + before, metadata)
            store = write_store(work / "store", vectors, items, model={"config_hash": model_hash})
            res = add_to_index(root, store, **options)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    elif metadata is not None:
        raise UsageError("metadata= goes with an array of embeddings; a folder or store has its own")
    elif is_store_path(source):
        res = add_to_index(root, source, **options)
    else:
        res = add_images(root, source, model=model, layout=layout, **options)
    after = read_manifest(current_version(root))["next_id"]
    return dict(res, ids=list(range(before, after)))


def embed_images(images, model=None, batch_size: int = 64, device: str = "cpu", dim: int | None = None) -> np.ndarray:
    """``(n, d)`` float32 L2-normalised embeddings of images: file paths, a folder (every image in
    it, sorted), bytes or PIL images; decoded like everywhere in uniret (EXIF orientation applied).
    ``model``: a model directory, a loaded model, or None for the default model."""
    from PIL import Image

    from ..data.images import decode_image
    from .from_images import load_embedder

    if isinstance(images, (str, Path)) and Path(images).is_dir():
        from ..data import open_items

        items = open_items(images)
        images = [items.get_image_bytes(i) for i in range(len(items))]
    elif isinstance(images, (str, Path, bytes, Image.Image)):
        images = [images]
    decoded = []
    for im in images:
        if isinstance(im, Image.Image):
            decoded.append(im.convert("RGB"))
        elif isinstance(im, (bytes, bytearray)):
            decoded.append(decode_image(bytes(im)))
        elif isinstance(im, (str, Path)):
            path = Path(im)
            if not path.is_file():
                raise UniretError(f"{path}: no such image file")
            decoded.append(decode_image(path.read_bytes()))
        else:
            raise UsageError(f"cannot embed a {type(im).__name__}: give file paths, a folder, bytes or PIL images")
    embedder, _ = load_embedder(model, device=device)
    embedder = embedder.to(device)
    if not decoded:
        return np.zeros((0, embedder.config.dim if dim is None else dim), np.float32)
    return embedder.encode(decoded, dim=dim, batch_size=batch_size).float().cpu().numpy()
