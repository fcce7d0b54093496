"""uniret.embed: backbones, the universal embedding model, preprocessing, extraction, the store.

Names are imported lazily so that ``import uniret.embed`` (done by the CLI) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_backbone": "backbones",
    "Backbone": "backbones",
    "GeM": "backbones",
    "UniversalEmbedder": "model",
    "ModelConfig": "model",
    "build_model": "model",
    "load_model": "model",
    "resolve_model_dir": "model",
    "eval_transform": "preprocess",
    "train_transform": "preprocess",
    "embed_items": "extract",
    "EmbeddingStore": "store",
    "StoreWriter": "store",
    "write_store": "store",
    "store_fingerprint": "store",
    "open_finished": "store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
