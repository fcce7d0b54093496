"""Image preprocessing built from the preprocessing config a model directory stores.

The model's config (``preprocess``: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
``crop_mode``) is the single truth, read by ``UniversalEmbedder.transforms() -> (train, eval)``,
which extraction, training and search all use, so they can never disagree:

- eval: timm's own inference transform (``resolve_data_config`` + ``create_transform``): resize the
  short side to ``size / crop_pct``, centre-crop ``size`` (``crop_mode="squash"`` resizes both sides
  instead), normalise. ``crop_pct=1.0`` is the UDON/UnED reference's evaluation crop (no margin).
- train (METHOD.md §3): squash-resize to 256/224 of the input size, random crop, horizontal flip.
  timm's training transforms cannot express it (they offer RandomResizedCrop and keep-ratio resizes,
  never a squash before a fixed-size random crop), so this one is written here with torchvision.
"""

from __future__ import annotations

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
CROP_MODES = ("center", "squash", "border")


def preprocess_config(config) -> dict:
    """The preprocessing dict of a ModelConfig, a UniversalEmbedder, a Backbone or the dict itself."""
    for attr in ("config", "preprocess", "data_config"):
        if hasattr(config, attr) and not isinstance(config, dict):
            config = getattr(config, attr)
    if not isinstance(config, dict) or "input_size" not in config:
        raise UniretError("preprocessing needs input_size/mean/std; pass a model, its config or its preprocess dict")
    return config


def check_crop_pct(crop_pct: float | None) -> float | None:
    if crop_pct is not None and not 0 < float(crop_pct) <= 1:
        raise UniretError(f"--crop-pct must be in (0, 1] (1.0: resize the short side to the input size), not {crop_pct}")
    return None if crop_pct is None else float(crop_pct)


def _interp(cfg: dict) -> InterpolationMode:
    name = str(cfg.get("interpolation", "bicubic"))
    if name not in _INTERPOLATION:
        raise UniretError(f"unknown interpolation {name!r}; use one of {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def _size(cfg: dict) -> tuple[int, int]:
    _, h, w = cfg["input_size"]
    return int(h), int(w)


def eval_transform(config) -> Callable[[object], torch.Tensor]:
    """PIL image -> normalised (3, H, W) float tensor, as the model expects it at inference (timm's
    inference transform for the stored config)."""
    from timm.data import create_transform, resolve_data_config

    cfg = preprocess_config(config)
    _interp(cfg)  # an unknown name is a one-line error here, not an assertion inside timm
    check_crop_pct(cfg.get("crop_pct"))
    if cfg.get("crop_mode", "center") not in CROP_MODES:
        raise UniretError(f"unknown crop_mode {cfg['crop_mode']!r}; use one of {', '.join(CROP_MODES)}")
    data_config = resolve_data_config(args={k: cfg[k] for k in ("input_size", "mean", "std", "interpolation",
                                                                  "crop_pct", "crop_mode") if k in cfg})
    return create_transform(**data_config, is_training=False)


def train_transform(config, hflip: bool = True) -> Callable[[object], torch.Tensor]:
    """The reference training augmentation for a preprocessing config (METHOD.md §3).

    PIL image -> normalised (3, H, W) tensor: squash-resize to 256/224 x the input size (both sides,
    the config's interpolation), random crop of the input size, horizontal flip with p=0.5 when
    ``hflip``, then the config's mean/std. ``config`` is anything :func:`preprocess_config` accepts.
    """
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
