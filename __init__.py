"""uniret: one universal image embedding and one index for many visual domains.

Subpackages: ``uniret.data`` (collections and the LMDB image store), ``uniret.embed`` (backbones,
the universal model, extraction), ``uniret.index`` (Faiss indexes, search, reranking),
``uniret.eval`` (UnED metrics and reports) and ``uniret.train`` (UDON training; optional for
everything else).
"""

__version__ = "0.1.0"
