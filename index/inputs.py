"""What every index build starts from, in RAM or on disk: the store, the output directory, the model
copied beside the index.

``is_own_index`` recognises an ``--out`` uniret may write into (an index directory, or what an
interrupted first build left, on-disk work directories included); ``model_to_copy`` picks and checks
the model to copy; ``copy_model`` publishes the copy as ``INDEX/model``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..embed.store import EmbeddingStore
from ..errors import UniretError
from ..utils import publish_dir, read_json
from .layout import MODEL_DIR, is_index_dir

WORK_DIRS = ("ondisk-build", "ondisk-update")  # on-disk builds' shards (index/ondisk/shards.py)
EMBED_DIRS = ("embeddings", ".embeddings.lock")  # a one-step build's store (index/from_images.py)


def open_store(store) -> EmbeddingStore:
    return store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)


def model_hash_of_dir(model_dir: Path) -> str:
    from ..embed.model import CONFIG_NAME, resolve_model_dir

    return read_json(resolve_model_dir(model_dir) / CONFIG_NAME).get("config_hash")


def copy_model(root: Path, model_dir: Path | None) -> str | None:
    if model_dir is None:
        return MODEL_DIR if (root / MODEL_DIR / "config.json").is_file() else None
    from ..embed.model import resolve_model_dir

    src = resolve_model_dir(model_dir)
    tmp = root / f".{MODEL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    add_graph(tmp)
    publish_dir(tmp, root / MODEL_DIR)
    return MODEL_DIR


def add_graph(model_copy: Path) -> None:
    """Keep the model's exported ONNX graph in the index's copy (``model.onnx``), so that a server
    running ONNX Runtime never loads the torch weights; skipped when ONNX Runtime is not installed
    or the model does not export (the copy then serves with torch)."""
    from ..embed.onnx import have_onnxruntime, save_graph, stored_embedder

    if not have_onnxruntime():
        return
    try:
        if stored_embedder(model_copy) is not None:
            return
    except UniretError:
        pass  # a damaged graph: export it again
    from ..embed.model import load_model

    save_graph(load_model(model_copy), model_copy)


def is_leftover(path: Path) -> bool:
    """Files an interrupted first build leaves behind (a re-run may reuse the directory)."""
    return (path.name in (".lock", MODEL_DIR, f".{MODEL_DIR}.tmp", f"{MODEL_DIR}.old", *WORK_DIRS, *EMBED_DIRS)
            or path.name.endswith(".partial"))


def is_own_index(path: Path) -> bool:
    """An index directory, or what an interrupted first build left (a re-run may reuse it)."""
    return is_index_dir(path) or (path.is_dir() and any(path.iterdir()) and all(is_leftover(p) for p in path.iterdir()))


def model_to_copy(store: EmbeddingStore, model_dir) -> Path | None:
    """The model to copy into the index: ``--model`` (checked against the store), else the one the
    store records, when it is there and matches."""
    recorded = (store.manifest.get("model") or {}).get("path")
    if model_dir is None and recorded and Path(recorded, "config.json").is_file():
        if model_hash_of_dir(Path(recorded)) == store.model_hash:
            model_dir = recorded  # the store says where its model is: copy it without --model
    if model_dir is not None:
        model_hash = model_hash_of_dir(Path(model_dir))
        if model_hash != store.model_hash:
            raise UniretError(f"--model {model_dir} is model {model_hash}, but {store.path} was embedded by "
                              f"{store.model_hash}; pass the model that made the store")
    return Path(model_dir) if model_dir is not None else None
