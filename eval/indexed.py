"""Evaluation through a real index directory (``--index-kind`` other than flat): the merged index is
built with :func:`uniret.index.build_index` and searched with its :class:`~uniret.index.Searcher`, so
the metrics include the index's approximation (IVF probing, SQ8/PQ codes, HNSW)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..embed.store import write_store
from ..errors import UniretError
from .protocol import evaluate_embeddings


def evaluate_with_index(query_vectors: np.ndarray, query_items: list, index_vectors: np.ndarray, index_items: list,
                        self_match: bool, k: int, rerank: str | None, index_kind: str, device: str | None,
                        work_dir: Path, key: str, model_hash: str) -> dict:
    """Build (or reuse, by ``key``) the merged index of ``index_vectors`` and evaluate through it."""
    from ..index import Searcher, build_index

    work_dir = Path(work_dir)
    store_dir, index_dir = work_dir / f"{key}-store", work_dir / f"{key}-{index_kind}"
    if not (index_dir / "CURRENT").is_file():
        store = write_store(store_dir, index_vectors, list(index_items), model={"config_hash": model_hash})
        build_index(store, index_dir, kind=index_kind, gpu="auto" if device in (None, "auto") or
                    str(device).startswith("cuda") else "off")
    searcher = Searcher.open(index_dir)
    if searcher.count != len(index_items):
        raise UniretError(f"{index_dir} holds {searcher.count} vectors, expected {len(index_items)}; delete it")
    result = evaluate_embeddings(query_vectors, query_items, index_vectors, index_items, self_match, k=k,
                                 protocol="merged", rerank=rerank, device=device,
                                 search_fn=lambda xq, depth: searcher.search(xq, depth))
    result["index"] = {"kind": index_kind, "dir": str(index_dir), "key": searcher.manifest.get("key")}
    return result
