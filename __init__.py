"""uniret: one universal image embedding and one index for many visual domains.

Subpackages: ``uniret.data`` (collections and the LMDB image store), ``uniret.embed`` (backbones,
the universal model, extraction), ``uniret.index`` (Faiss indexes, search, reranking),
``uniret.eval`` (UnED metrics and reports), ``uniret.serve`` (the HTTP server) and ``uniret.train``
(UDON training; optional for everything else). ``uniret.open_index(path)`` is the search layer
(:mod:`uniret.index.api`); ``uniret.build_index`` (a folder, a store or an array) and
``uniret.embed_images`` the write side (:mod:`uniret.index.create`). They are imported on first
use, so ``import uniret`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["open_index", "build_index", "embed_images", "__version__"]


def __getattr__(name: str):
    if name == "open_index":
        from .index.api import open_index

        return open_index
    if name in ("build_index", "embed_images"):
        from .index import create

        return getattr(create, name)
    raise AttributeError(f"module 'uniret' has no attribute {name!r}")
