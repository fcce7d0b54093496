"""Images to an index in one step: ``uniret index build FOLDER --out INDEX`` and ``uniret index add
INDEX FOLDER``.

The input is anything ``uniret embed --data`` takes (an image folder, labelled by its subfolders as
:mod:`uniret.data.folder` says; a collection root; a packed store; webdataset shards). It is embedded
into ``INDEX/embeddings`` (resumable: an interrupted run continues where it stopped), indexed like
a store (:mod:`uniret.index.build`), and the temporary store is removed. The model is ``model`` (a
model directory, copied into the index) or, without one, the default model
(:func:`uniret.embed.default.default_model`), saved into the index so that image queries work.
The index records where the images are (:func:`uniret.index.images.source_entry`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..data import open_items
from ..errors import UniretError
from ..guards import claim_output
from ..utils import announce_model_load
from .inputs import is_own_index
from .layout import MODEL_DIR, is_index_dir

logger = logging.getLogger("uniret")

#: The temporary store of a one-step build or add, inside the index directory.
EMBED_DIR = "embeddings"


def is_store_path(path) -> bool:
    """Whether ``path`` is an embedding store, or meant to be one (a manifest, parts, format-1 files:
    a damaged store gets the store's own error, not "no images"); anything else is taken as images."""
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in ("manifest.json", "parts", "embeddings.npy"))


def load_embedder(model=None, device: str = "cpu"):
    """``model`` (a model directory, or a loaded :class:`~uniret.embed.model.UniversalEmbedder`) or the
    default model; returns ``(model, its directory or None)``."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model, getattr(model, "source_dir", None)
    announce_model_load(model)
    from ..embed.commands import quiet_open_clip_warnings

    quiet_open_clip_warnings()
    if model is None:
        from ..embed.default import default_model

        return default_model(device="cpu"), None
    from ..embed.model import load_model, resolve_model_dir

    return load_model(model), resolve_model_dir(model)


def embed_source(embedder, items, source, store_dir: Path, layout: str = "auto", batch_size: int = 64,
                 workers: int | None = None, device: str | None = None):
    """Embed ``items`` (of ``source``) into the store ``store_dir`` (resumable); returns the store."""
    from ..embed.extract import embed_items

    if workers is None:  # worker processes pay off only past a few hundred images
        workers = 0 if len(items) < 256 else min(8, os.cpu_count() or 1)
    info = {"path": str(Path(source).resolve()), "domains": [], "splits": [], "layout": layout}
    return embed_items(embedder, items, store_dir, batch_size=batch_size, workers=workers, device=device,
                       dtype="float16", resume=True, source=info, overwrite=True, inputs=[source])


def build_from_images(source, out, model=None, layout: str = "auto", kind: str = "auto", gpu: str = "auto",
                      gpus: int | None = None, max_memory: int | None = None, target_recall: float = 0.95,
                      recall_k: int = 100, overwrite: bool = False, batch_size: int = 64,
                      workers: int | None = None, device: str | None = None) -> Path:
    """Embed ``source`` with ``model`` (default: the default model) and build the index ``out`` from
    it; returns the new version directory. ``out`` as for :func:`uniret.index.build.build_index`."""
    from .build import _build

    root = Path(out)
    model_input = model if isinstance(model, (str, os.PathLike)) else None
    with claim_output(root, "index directory", is_own_index, inputs=[source, model_input],
                      overwrite=overwrite or not is_index_dir(root)):
        created = not root.exists()
        try:
            items = open_items(source, layout=layout)  # no images: one line before a model is loaded
            embedder, model_dir = load_embedder(model, device="cpu")
            root.mkdir(parents=True, exist_ok=True)
            store = embed_source(embedder, items, source, root / EMBED_DIR, layout, batch_size, workers, device)
            if model_dir is None:
                # No model directory to copy (the default model, or one built in Python): save it, so
                # that the index embeds image queries with the model that embedded its items.
                embedder.save(root / MODEL_DIR)
            version = _build(store, root, kind, gpu, gpus, max_memory, target_recall, recall_k, model_dir,
                             1000, False, 0)
        except BaseException:
            # No half-made index under the final name; but embeddings made so far stay, so that the
            # same command resumes (the directory is then recognised as an interrupted build).
            if created and not any(root.glob(f"{EMBED_DIR}*")):
                shutil.rmtree(root, ignore_errors=True)
            raise
        shutil.rmtree(root / EMBED_DIR, ignore_errors=True)
        return version


def add_images(index_dir, source, model=None, layout: str = "auto", batch_size: int = 64,
               workers: int | None = None, device: str | None = None, max_memory: int | None = None,
               replace: bool = False) -> dict:
    """Embed ``source`` with the index's model (its copy, or ``model``) and add the new items (``replace``:
    see :func:`uniret.index.build.add_to_index`)."""
    from .build import add_to_index
    from .layout import current_version, read_manifest

    root = Path(index_dir)
    manifest = read_manifest(current_version(root))  # not an index: one line before any work
    if model is None:
        if not (root / MODEL_DIR / "config.json").is_file():
            raise UniretError(f"{root} holds no model copy (built from a store without --model); pass --model DIR, "
                              "the model that embedded the index")
        model = root / MODEL_DIR
    items = open_items(source, layout=layout)
    embedder, _ = load_embedder(model, device="cpu")
    want = (manifest.get("model") or {}).get("config_hash")
    if want and embedder.config_hash() != want:
        raise UniretError(f"--model {model} is model {embedder.config_hash()}, but index {root} was built from "
                          f"{want}; add with the model that embedded the index")
    # beside the index, not in it (no command writes inside another uniret output); the same path on a
    # re-run, so an interrupted add resumes its embedding
    store_dir = root.parent / f".{root.name}.add-{EMBED_DIR}"
    store = embed_source(embedder, items, source, store_dir, layout, batch_size, workers, device)
    result = add_to_index(root, store, max_memory=max_memory, replace=replace)
    shutil.rmtree(store_dir, ignore_errors=True)
    return result
