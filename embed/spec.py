"""``ModelSpec``: the one declaration of what a model is built from (backbone, weights, input size,
pooling, crop, embedding size, nesting, head).

``uniret model init`` builds one from its options, ``uniret train`` holds one inside its
``TrainConfig`` (which extends it), and :func:`uniret.embed.model.build_model` builds the model from
its fields; the CLI help of each option is :data:`HELP`. Importing this module does not load torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

HELP = {
    "backbone": "timm:MODEL or timm:MODEL.TAG, open_clip:ARCH or open_clip:ARCH/PRETRAINED, plain:cnn6, a "
                "registered source's name, or a model (or training run) directory.",
    "pretrained": "Start from pretrained weights: a weights package that registers them (offline), else the hub cache.",
    "weights": "Backbone weights from this file (safetensors or a plain state dict).",
    "image_size": "Input size in pixels (default: the backbone's).",
    "pool": "CNN pooling: avg, max, token, gem (learnable p) or gem:P (fixed p) (default: the backbone's).",
    "crop_pct": "Evaluation crop: resize the short side to input size / crop-pct, centre-crop; 1.0 = the "
                "UDON/UnED reference (no margin) (default: the backbone's).",
    "dim": "Universal embedding size (default 64; with --head none the backbone's width).",
    "nested_dims": "Matryoshka prefix sizes, each usable alone, e.g. 8,16,32,64.",
    "head": "linear: a projection to --dim that `uniret train` trains (random until then); none: the backbone's "
            "pooled, L2-normalised features; pca: PCA-whitening to --dim fitted on images (no training).",
}


@dataclass
class ModelSpec:
    """Everything a model is built from (see :data:`HELP` for each field)."""

    backbone: str = ""
    pretrained: bool = False
    weights: str | None = None
    image_size: int | None = None
    pool: str | None = None  # CNN pooling, e.g. "gem" or "gem:4.6"; None = the backbone's
    crop_pct: float | None = None  # eval crop; 1.0 = the reference's (short side to size, centre crop)
    dim: int | None = None  # universal (student) embedding; None: 64 (head none: the feature width)
    # Matryoshka (METHOD.md §6): prefix sizes of the embedding trained to be usable on their own,
    # e.g. [8, 16, 32, 64]; None = no nesting.
    nested_dims: list[int] | None = None
    head: str = "linear"

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(ModelSpec)]

    @classmethod
    def of(cls, obj) -> ModelSpec:
        """The spec part of any object with these attributes (a TrainConfig, a namespace)."""
        return ModelSpec(**{name: getattr(obj, name) for name in cls.fields()})

    def build(self):
        """The :class:`~uniret.embed.model.UniversalEmbedder` this spec describes."""
        from .model import build_model

        return build_model(**{name: getattr(self, name) for name in self.fields()})

