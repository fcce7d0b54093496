"""Inference preprocessing with Pillow and numpy: a batch of PIL images -> one (N, 3, H, W) float32 array.

The same computation as the model's eval transform (timm's ``create_transform(is_training=False)``,
:func:`uniret.embed.preprocess.eval_transform`) for the configs that transform builds from
``Resize`` + ``CenterCrop`` (``crop_mode`` center or squash), without torch: torchvision's Resize
of a PIL image *is* Pillow's ``resize`` with the same filter, its CenterCrop is a crop (zero padding
when the image is smaller), and ToTensor + Normalize become one vectorised multiply-add over the
whole batch. So the ONNX runtime (and a server running it) preprocesses without importing torch,
and a batch costs one array operation instead of a chain of tensor ops per image.

:func:`draft_size` says how large a JPEG must be decoded for this preprocessing, so that decoders
can use Pillow's reduced DCT decode (``Image.draft``) for large photos.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import UniretError

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ImagePrep:
    """Eval preprocessing of one model's ``preprocess`` config as Pillow + numpy (see the module docstring)."""

    def __init__(self, config: dict):
        _, h, w = (int(v) for v in config["input_size"])
        self.size = (h, w)
        crop_pct = float(config.get("crop_pct") or 0.875)  # timm's default when unset
        self.scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        self.mode = str(config.get("crop_mode") or "center")
        name = str(config.get("interpolation", "bicubic"))
        if name not in _FILTERS:
            raise UniretError(f"unknown interpolation {name!r}; use one of {', '.join(_FILTERS)}")
        self.filter = _FILTERS[name]
        mean = np.asarray(config["mean"], dtype=np.float32)
        std = np.asarray(config["std"], dtype=np.float32)
        # (x / 255 - mean) / std as one multiply-add per element: x * a + b.
        self._a = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1)
        self._b = (-mean / std).reshape(1, 3, 1, 1)

    @staticmethod
    def supports(config: dict) -> bool:
        """Whether this class reproduces the eval transform of ``config`` (else use the torch one)."""
        _, h, w = config["input_size"]
        crop_pct = float(config.get("crop_pct") or 0.875)
        mode = str(config.get("crop_mode") or "center")
        square_scale = math.floor(h / crop_pct) == math.floor(w / crop_pct)
        return (str(config.get("interpolation", "bicubic")) in _FILTERS
                and (mode == "squash" or (mode == "center" and square_scale)))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to before the crop (torchvision's Resize rule)."""
        if self.mode == "squash":
            return self.scale[1], self.scale[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.scale[0], int(self.scale[0] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8: one RGB image resized and centre-cropped to the input size."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.resized_size(*image.size)
        if size != image.size:
            image = image.resize(size, self.filter)
        h, w = self.size
        width, height = image.size
        if w > width or h > height:  # smaller than the crop: pad with zeros, as CenterCrop does
            canvas = Image.new("RGB", (max(w, width), max(h, height)))
            canvas.paste(image, ((max(w, width) - width) // 2, (max(h, height) - height) // 2))
            image, (width, height) = canvas, canvas.size
        top, left = int(round((height - h) / 2.0)), int(round((width - w) / 2.0))
        if (left, top, w, h) != (0, 0, width, height):
            image = image.crop((left, top, left + w, top + h))
        return np.asarray(image, dtype=np.uint8)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 model input, in one array operation."""
        # One pass from the (N, C, H, W) view of the uint8 pixels into a contiguous float32 array
        # (astype of the transposed view would be a strided copy, ten times slower), then the offset.
        x = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
        np.multiply(pixels.transpose(0, 3, 1, 2), self._a, out=x, casting="unsafe")
        x += self._b
        return x

    def __call__(self, images) -> np.ndarray:
        """A list of PIL images -> the (N, 3, H, W) float32 batch the model takes."""
        h, w = self.size
        if not images:
            return np.zeros((0, 3, h, w), dtype=np.float32)
        return self.normalise(np.stack([self.pixels(im) for im in images]))


def draft_size(config: dict) -> tuple[int, int]:
    """The smallest (width, height) a decoded image must keep for ``config``'s preprocessing: its
    resize target's short side on both sides (a reduced JPEG decode stays at least this large)."""
    _, h, w = (int(v) for v in config["input_size"])
    crop_pct = float(config.get("crop_pct") or 0.875)
    side = max(math.floor(h / crop_pct), math.floor(w / crop_pct))
    return side, side
