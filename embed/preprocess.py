"""Image preprocessing built from the preprocessing a model directory stores.

The same dict (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``)
drives embedding and training, so the two can never disagree:

- eval: resize the short side to ``size / crop_pct`` and centre-crop ``size`` (``crop_mode="squash"``
  resizes both sides instead), then normalise.
- train (METHOD.md §3): squash-resize to 256/224 of the input size, random crop, horizontal flip.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..errors import UniretError

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def preprocess_config(config) -> dict:
    """The preprocessing dict of a ModelConfig, a UniversalEmbedder, a Backbone or the dict itself."""
    for attr in ("config", "preprocess", "data_config"):
        if hasattr(config, attr) and not isinstance(config, dict):
            config = getattr(config, attr)
    if not isinstance(config, dict) or "input_size" not in config:
        raise UniretError("preprocessing needs input_size/mean/std; pass a model, its config or its preprocess dict")
    return config


def _interp(cfg: dict) -> InterpolationMode:
    name = str(cfg.get("interpolation", "bicubic"))
    if name not in _INTERPOLATION:
        raise UniretError(f"unknown interpolation {name!r}; use one of {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def _size(cfg: dict) -> tuple[int, int]:
    _, h, w = cfg["input_size"]
    return int(h), int(w)


def eval_transform(config) -> Callable[[object], torch.Tensor]:
    """PIL image -> normalised (3, H, W) float tensor, as the model expects it at inference."""
    cfg = preprocess_config(config)
    h, w = _size(cfg)
    crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
    interp = _interp(cfg)
    if cfg.get("crop_mode") == "squash":
        resize = T.Resize((int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct))), interpolation=interp)
    elif h == w:
        resize = T.Resize(int(math.floor(h / crop_pct)), interpolation=interp)
    else:
        resize = T.Resize((int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct))), interpolation=interp)
    return T.Compose([
        resize,
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


def train_transform(config, hflip: bool = True) -> Callable[[object], torch.Tensor]:
    """Reference training augmentation: squash-resize to 256/224 x input size, random crop, h-flip."""
    cfg = preprocess_config(config)
    h, w = _size(cfg)
    steps = [
        T.Resize((round(h * 256 / 224), round(w * 256 / 224)), interpolation=_interp(cfg)),
        T.RandomCrop((h, w)),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(steps)
