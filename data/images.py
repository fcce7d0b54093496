"""Image decoding and plain image folders.

Decoding is separate from storage: sources hand out bytes, :func:`decode_image` turns them into an
RGB ``PIL.Image`` or raises :class:`~uniret.errors.ImageDecodeError` so that callers can skip and
report the image instead of crashing: decompression bombs (over :data:`MAX_PIXELS`) are refused
before they are decoded, and 16-bit and float images are scaled to 8 bits rather than clipped.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError, UniretError
from ..safeio import is_utf8_name
from ..utils import logger
from .collection import Item, ItemList


def _register_heif() -> bool:
    """Let Pillow open HEIF/HEIC (phone photos) when the optional ``pillow-heif`` is installed
    (``pip install 'uniret[heif]'``); AVIF is Pillow's own from 11.3."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


_register_heif()

#: File name endings taken as images when a plain folder is embedded or searched: the common ones,
#: plus HEIF/HEIC and AVIF where the installed Pillow (or pillow-heif) opens them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm") + tuple(
    ext for ext in (".avif", ".heic", ".heif") if ext in Image.registered_extensions())


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB image (fully loaded, so truncation is caught here), turned
    upright by its EXIF orientation (a phone photo stored sideways is embedded, searched and shown as
    it was taken).

    Raises :class:`ImageDecodeError` with a one-line reason, e.g. "cannot decode image: not a known
    image format" or "cannot decode image: truncated or corrupt PNG (image file is truncated)".
    """
    try:
        with warnings.catch_warnings():
            # Over MAX_PIXELS is refused just below, in one line; Pillow's raw warning would come first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot decode image: not a known image format") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"cannot decode image: over the limit of {MAX_PIXELS:,} pixels "
                               "(a decompression bomb?)") from None
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot decode image: {short_reason(exc)}") from None
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageDecodeError(f"cannot decode image: {width} x {height} pixels is over the limit of "
                                   f"{MAX_PIXELS:,} (a decompression bomb?)")
        try:
            im.load()
            _exif_upright(im)
            if im.mode in _WIDE_MODES:
                return _to_8bit(im).convert("RGB")
            if im.mode in ("RGBA", "LA", "P") and ("transparency" in im.info or im.mode != "P"):
                # Composite transparent artwork on white rather than on black.
                rgba = im.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            return im.convert("RGB")
        except _DECODE_ERRORS as exc:
            raise ImageDecodeError(f"cannot decode image: truncated or corrupt {im.format} ({short_reason(exc)})") from None


def _exif_upright(im: Image.Image) -> None:
    """Apply the EXIF orientation tag in place (and drop it); a damaged EXIF block leaves the image as
    stored rather than failing the decode."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error):
        pass


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

#: Largest image decoded (pixels): Pillow's own decompression-bomb limit, refused outright with a
#: one-line reason instead of Pillow's raw warning (silenced while opening).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

#: Modes of more than 8 bits per channel, which Pillow's convert("RGB") clips instead of scaling
#: (a 16-bit PNG comes out almost white, a float TIFF almost black).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit(im: Image.Image) -> Image.Image:
    """A grey image of 16-bit, 32-bit or float samples scaled to 8 bits: 16-bit samples by 1/257,
    floats in [0, 1] by 255; anything else by its own range."""
    arr = np.asarray(im, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and 0 <= lo and hi <= 65535 and hi > 255):
        scaled = arr / 257.0
    elif im.mode == "F" and 0 <= lo and hi <= 1:
        scaled = arr * 255.0
    elif 0 <= lo and hi <= 255:
        scaled = arr
    else:
        scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.nan_to_num(scaled, nan=0.0).clip(0, 255).round().astype(np.uint8), mode="L")


def short_reason(exc: BaseException) -> str:
    """Pillow's message on one short line, without the object reprs it sometimes embeds."""
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    text = (text.splitlines() or [""])[0][:160].rstrip(" :")
    return text or type(exc).__name__


def readable_formats() -> str:
    """The image formats a folder or an upload may hold, for messages: "JPEG, PNG, ..."."""
    names = {".jpg": "JPEG", ".png": "PNG", ".webp": "WebP", ".gif": "GIF", ".bmp": "BMP", ".tif": "TIFF",
             ".ppm": "PPM", ".avif": "AVIF", ".heic": "HEIC"}
    return ", ".join(name for ext, name in names.items() if ext in IMAGE_EXTENSIONS)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(root: Path) -> list[str]:
    """The image files under ``root`` (relative, sorted); names that are not UTF-8 are skipped and
    listed in one warning line (they could be stored nowhere as text)."""
    found = sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if is_image_file(f))
    files = [f for f in found if is_utf8_name(f)]
    if len(files) < len(found):
        skipped = [f for f in found if not is_utf8_name(f)]
        logger.warning("%s: %d image file(s) whose names are not UTF-8 skipped, e.g. %s; rename them",
                       root, len(skipped), ", ".join(skipped[:3]))
    return files


def image_folder_items(path: str | Path) -> ItemList:
    """A single image file, or every image under a folder (recursively, sorted by relative path)."""
    p = Path(path)
    if p.is_file():
        if not is_image_file(p):
            raise UniretError(f"{p}: not an image file (known endings: {', '.join(IMAGE_EXTENSIONS)})")
        return ItemList([Item(p.name, position=0)], base=p.parent)
    if not p.is_dir():
        raise UniretError(f"{p}: no such file or directory")
    files = list_image_files(p)
    if not files:
        raise UniretError(f"{p}: no image files found (known endings: {', '.join(IMAGE_EXTENSIONS)})")
    return ItemList([Item(f, position=i) for i, f in enumerate(files)], base=p)
