"""uniret.index: exact and approximate search over embedding stores, reranking, index directories.

Public API: :func:`exact_search`, the rerankers and their registry :data:`RERANKERS` (in
:mod:`uniret.index.rerank`; ``uniret.index.rerank`` is that module, not a function),
:func:`build_index`, :class:`Searcher`, and the search layer :func:`open_index` -> :class:`Index`.
Heavy parts (faiss, torch, lmdb) load lazily on first use.
"""

from .exact import exact_search
from .rerank import RERANKERS, alpha_qe, aqe, superglobal

__all__ = ["exact_search", "superglobal", "aqe", "alpha_qe", "RERANKERS", "build_index", "Searcher", "open_index",
           "Index", "Results"]


def __getattr__(name: str):
    # The index directory code pulls in lmdb and faiss; keep `import uniret.index` light.
    if name == "build_index":
        from .build import build_index

        return build_index
    if name == "Searcher":
        from .searcher import Searcher

        return Searcher
    if name in ("open_index", "Index", "Results"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
