"""Image folders for tests: subfolders as classes, and a phone photo stored sideways with an EXIF
orientation tag beside its upright twin."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: EXIF tag 0x0112 (Orientation) = 6: "rotate 90 degrees clockwise to show" (how phones store portraits).
ORIENTATION = 0x0112


def pattern(seed: int, size: int = 64) -> Image.Image:
    """An asymmetric picture (a gradient, a bar and a blob placed by ``seed``): rotating it changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.2, 0.8, 3)
    img = np.stack([base[c] * (0.4 + 0.6 * x) for c in range(3)], axis=-1)
    top = int(rng.integers(0, size // 2))
    img[top:top + size // 8, : size * 3 // 4] = rng.uniform(0, 1, 3)  # a bar from the left edge
    cy, cx = rng.integers(size // 4, size * 3 // 4, 2)
    img[(y * size - cy) ** 2 + (x * size - cx) ** 2 < (size / 8) ** 2] = rng.uniform(0, 1, 3)
    return Image.fromarray((img * 255).astype(np.uint8))


def sideways_jpeg(upright: Image.Image) -> bytes:
    """The JPEG a phone writes for ``upright``: pixels stored rotated, EXIF orientation 6 saying how
    to turn them back."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def make_photo_folder(root: Path, classes=("cat", "dog", "tree"), per_class: int = 5) -> dict:
    """``root/<class>/<n>.jpg`` plus ``root/cat/phone.jpg`` (sideways + EXIF) and its upright twin
    ``root/cat/upright.jpg``. Returns the relative paths of the phone photo and its twin."""
    root = Path(root)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pattern(100 * ci + i).save(root / name / f"{i}.jpg", quality=95)
    twin = pattern(999)
    twin.save(root / classes[0] / "upright.jpg", quality=95)
    (root / classes[0] / "phone.jpg").write_bytes(sideways_jpeg(twin))
    return {"phone": f"{classes[0]}/phone.jpg", "twin": f"{classes[0]}/upright.jpg"}
