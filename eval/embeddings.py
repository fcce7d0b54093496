"""Embedding for evaluation: which items an evaluation needs, embedded once per model and data.

The query and index splits of every domain are embedded into an embedding store kept in a cache,
keyed by the model's config hash, the collection and the split, so a second evaluation of the same
model and data embeds nothing. With one model per domain ("Specialist + Oracle") each domain's items
are embedded by that domain's model into its own cached store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Item, ItemList
from ..errors import UniretError
from ..safeio import check_finite
from ..utils import stable_hash

logger = logging.getLogger("uniret")


def plan_items(collection, split: str) -> tuple[list[Item], dict[str, tuple[str, str]]]:
    """Every item the evaluation needs (query and index splits of each domain, each split once) and
    each domain's (query split, index split)."""
    pairs: dict[str, tuple[str, str]] = {}
    for d in collection.domains:
        if not collection.has_split(d, split):
            logger.warning("domain %s has no %s split: left out of the evaluation", d, split)
            continue
        pairs[d] = collection.query_index_splits(d, split)
    if not pairs:
        raise UniretError(f"{collection.root}: no domain has a {split!r} split; evaluate --split test or val")
    items: list[Item] = []
    for d, splits in pairs.items():
        for s in dict.fromkeys(splits):
            items.extend(Item(r.path, d, s, i, r.class_ids) for i, r in enumerate(collection.records(d, s)))
    return items, pairs


def data_key(collection, items: list[Item]) -> str:
    """A hash of where the data is and what it holds (paths and labels of the evaluated items)."""
    content = stable_hash([[it.domain, it.split, it.path, list(it.class_ids)] for it in items])
    return stable_hash({"root": str(Path(collection.root).resolve()), "content": content})


def cached_store(model, collection, items: list[Item], split: str, cache_dir: Path, device=None,
                 batch_size: int = 64, workers: int = 0):
    """The embedding store of ``items`` under ``cache_dir`` and whether it was reused: reused when the
    same model embedded the same data before, otherwise computed (resumably) by ``embed_items``."""
    from ..embed.store import open_finished, store_fingerprint

    model_hash = model.config_hash()
    path = Path(cache_dir) / f"{model_hash}-{data_key(collection, items)[:12]}-{split}"
    item_list = ItemList(items, source=collection)
    # The image files' sizes and mtimes are part of the key: replaced images are embedded again.
    fingerprint = store_fingerprint(items, model.config.dim, "float16", model_hash, files=item_list.content_key())
    store = open_finished(path, fingerprint)
    if store is not None:
        logger.info("reusing embeddings in %s", path)
        return store, True
    logger.info("embedding %d images into %s", len(items), path)
    from ..embed.extract import embed_items

    # The cache is uniret's own: a stale entry (other images) is simply replaced.
    store = embed_items(model, item_list, path, batch_size=batch_size, workers=workers, device=device,
                        dtype="float16", resume=True, overwrite=True)
    return store, False


@dataclass
class EvalEmbeddings:
    """The evaluated items' vectors (row i = items[i]) and where they came from."""

    vectors: np.ndarray  # (n, dim) float32
    valid: np.ndarray  # (n,) bool: False where an image could not be embedded
    stores: dict  # None (one model) or a domain -> its EmbeddingStore
    reused: bool  # every store came from the cache

    @property
    def model_hash(self) -> str:
        """The model's config hash; with one model per domain, a hash of the per-domain hashes."""
        if None in self.stores:
            return self.stores[None].model_hash
        return stable_hash({d: s.model_hash for d, s in self.stores.items()})


def _check_vectors(store) -> None:
    """Refuse a model that gave NaN/inf embeddings (its rows were stored as failures) and a cached store
    whose vectors are not finite: metrics of either would be silently wrong."""
    from ..embed.store import NONFINITE

    broken = sorted(int(i) for i, why in store.failed.items() if why == NONFINITE)
    if broken:
        shown = ", ".join(map(str, broken[:5])) + (", ..." if len(broken) > 5 else "")
        raise UniretError(f"the model gave NaN or infinite embeddings for {len(broken)} image(s) (ids {shown}); "
                          "it is broken (diverged training?): re-train it or check its weights")
    rows = np.flatnonzero(store.valid_mask)
    check_finite(store.embeddings[rows], f"cached embeddings {store.path}", ids=rows)


def embed_for_evaluation(models: dict, collection, items: list[Item], split: str, cache_dir: Path,
                         device=None, batch_size: int = 64, workers: int = 0) -> EvalEmbeddings:
    """Embed ``items`` with ``models``: ``{None: model}``, or ``{domain: model}`` where each domain's
    items are embedded by its own model (the models must share one embedding size)."""
    vectors, valid, stores, reused = None, np.ones(len(items), dtype=bool), {}, True
    for key, model in models.items():
        rows = [i for i, it in enumerate(items) if key is None or it.domain == key]
        part, was_cached = cached_store(model, collection, [items[i] for i in rows], split, Path(cache_dir),
                                        device=device, batch_size=batch_size, workers=workers)
        if vectors is None:
            vectors = np.zeros((len(items), part.dim), dtype=np.float32)
        if part.dim != vectors.shape[1]:
            raise UniretError(f"per-domain models must share one embedding size ({part.dim} vs {vectors.shape[1]})")
        _check_vectors(part)
        vectors[rows] = np.asarray(part.embeddings, dtype=np.float32)
        valid[rows] = part.valid_mask
        stores[key] = part
        reused = reused and was_cached
    return EvalEmbeddings(vectors, valid, stores, reused)
