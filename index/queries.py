"""Query inputs of the search layer: turn any mix of paths, images, bytes, ids and arrays into rows.

:func:`prepare_queries` expands every query into one or more rows, each with a label (what the user
asked for: the full path of an image, ``id:N``, ``file.npy[i]``) and either a vector (stored ids and
embedding arrays) or a decoded image to embed. Everything a user can get wrong gives a one-line
:class:`~uniret.errors.UniretError`: unknown or malformed ids, non-numeric, non-finite or
wrong-dimension vectors, undecodable, truncated or oversized images (decompression bombs).

Only Pillow and numpy are imported here: id and vector queries never load torch.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageDecodeError, UniretError, UsageError
from .ids import MAX_ID, UnknownIdError, parse_id

logger = logging.getLogger("uniret")

#: Largest query image file read from disk.
MAX_IMAGE_BYTES = 64 << 20
#: Largest query image (pixels): Pillow's own bomb limit, refused outright instead of warned about.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Images over MAX_PIXELS are refused below with a one-line message; Pillow's warning about them
# would only add a raw multi-line warning to stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class QueryRows:
    """Expanded queries: ``labels[i]`` is row i; rows in ``image_rows`` still need embedding."""

    labels: list[str] = field(default_factory=list)
    vectors: list[np.ndarray | None] = field(default_factory=list)
    images: list[Image.Image | None] = field(default_factory=list)
    ids: list[int | None] = field(default_factory=list)
    inputs: dict[int, object] = field(default_factory=dict)  # row -> model input tensor (Index.preprocess)

    def add(self, label: str, vector=None, image=None, stored_id=None) -> None:
        self.labels.append(label)
        self.vectors.append(vector)
        self.images.append(image)
        self.ids.append(stored_id)

    @property
    def image_rows(self) -> list[int]:
        return [i for i, v in enumerate(self.vectors) if v is None]

    def model_input(self, row: int):
        """What the model embeds for an image row: its preprocessed tensor, else the image."""
        return self.inputs.get(row, self.images[row])


def decode_query_image(data: bytes, label: str = "image", draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to RGB, refusing images that declare more than :data:`MAX_PIXELS`.

    ``draft=(w, h)``: a JPEG at least twice that size on both sides is decoded at a reduced scale
    (Pillow's ``draft``: 1/2, 1/4 or 1/8 in the DCT, never below ``(w, h)``): a large photo then costs
    a fraction of a full decode, and the resize to the model's input starts from fewer pixels.
    """
    from ..data.images import decode_image, readable_formats, short_reason

    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            if (width * height <= MAX_PIXELS and probe.format in ("JPEG", "PNG") and probe.mode in ("RGB", "L")
                    and _upright(probe)):
                # The common case, decoded from this one open (decode_image would open the bytes again):
                # 8-bit RGB or grey, where decode_image's answer is load + convert. Anything else, and
                # any failure (reported there in one line), goes through decode_image.
                big = draft and probe.format == "JPEG" and width >= 2 * draft[0] and height >= 2 * draft[1]
                decoded = _load_rgb(probe, draft if big else None)
                if decoded is not None:
                    return decoded
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"{label}: over the limit of {MAX_PIXELS:,} pixels (a decompression bomb?); "
                               "downscale it first") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label}: this file is not an image uniret can read; send a picture "
                               f"({readable_formats()})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{label}: the image is damaged or cut short ({short_reason(exc)})") from None
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"{label}: {width} x {height} pixels is over the limit of {MAX_PIXELS:,} "
                               "(a decompression bomb?); downscale it first")
    try:
        return decode_image(data)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{label}: {exc}") from None


def _upright(image: Image.Image) -> bool:
    """Whether the image is stored upright (no EXIF orientation to apply): the fast path below cannot
    turn it; decode_image does (phone photos are often stored sideways)."""
    try:
        return image.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001 - a damaged EXIF block: let decode_image decide
        return False


def _load_rgb(image: Image.Image, draft: tuple[int, int] | None) -> Image.Image | None:
    """An opened 8-bit image decoded to RGB (a JPEG at a reduced scale with ``draft``), or None to
    leave it to ``decode_image`` (which reports what is wrong)."""
    try:
        if draft is not None:
            image.draft("RGB", draft)
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError):
        return None


def read_image_file(path: Path) -> bytes:
    """The bytes of a regular image file (no FIFOs or devices; at most :data:`MAX_IMAGE_BYTES`)."""
    if not path.is_file():
        raise UniretError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise UniretError(f"{path}: {size:,} bytes is over the {MAX_IMAGE_BYTES >> 20} MB limit for a query image")
    return path.read_bytes()


def check_vectors(arr, dim: int, label: str) -> np.ndarray:
    """An (n, dim) float32 array of finite numbers, or a one-line error saying what is wrong."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise UniretError(f"{label}: expected numbers, got an array of {arr.dtype}")
    arr = arr[None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise UniretError(f"{label}: expected an (n, {dim}) array of embeddings, got shape {arr.shape}; "
                          f"this index holds {dim}-d vectors")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise UniretError(f"{label}: row {int(np.flatnonzero(bad)[0])} has NaN or infinite values")
    if (np.linalg.norm(arr, axis=1) == 0).any():
        raise UniretError(f"{label}: a query vector is all zeros")
    return arr


def _load_npy(path: Path, dim: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UniretError(f"{path}: not a readable .npy of numbers ({exc})") from None
    return check_vectors(arr, dim, str(path))


def _add_path(rows: QueryRows, text: str, dim: int, draft=None) -> None:
    from ..data.images import image_folder_items

    path = Path(text)
    if path.suffix == ".npy" and path.is_file():
        for i, vec in enumerate(_load_npy(path, dim)):
            rows.add(f"{text}[{i}]", vector=vec)
        return
    if path.is_dir():
        items = image_folder_items(path)
        for i in range(len(items)):
            label = str(path / items[i].path)
            try:
                rows.add(label, image=decode_query_image(read_image_file(path / items[i].path), label, draft))
            except UniretError as exc:
                logger.warning("skipping %s", exc)
        return
    if path.exists() and not path.is_file():
        raise UniretError(f"QUERY {text!r}: not a regular file or folder")
    if not path.exists():
        raise UniretError(f"QUERY {text!r}: not an image file, a folder, id:N or an existing .npy")
    image_folder_items(path)  # checks the file name ending
    rows.add(text, image=decode_query_image(read_image_file(path), text, draft))


def prepare_queries(queries, searcher, draft: tuple[int, int] | None = None) -> QueryRows:
    """Expand ``queries`` (one query or a list) against ``searcher`` (for ids and the dimension).

    A query is an image path or folder, a ``.npy`` path, ``"id:N"`` or an int (a stored id), a PIL
    image, encoded image bytes, or a numpy array of embeddings ((dim,) or (n, dim)). ``draft``: the
    least (width, height) the model needs, for a reduced decode of large JPEGs (:func:`decode_query_image`).
    """
    if not isinstance(queries, (list, tuple)):
        queries = [queries]
    rows = QueryRows()
    for q in queries:
        if isinstance(q, Image.Image):
            rows.add(getattr(q, "filename", "") or "<image>", image=q.convert("RGB"))
        elif isinstance(q, (bytes, bytearray, memoryview)):
            rows.add("<bytes>", image=decode_query_image(bytes(q), "query image", draft))
        elif isinstance(q, np.ndarray):
            for i, vec in enumerate(check_vectors(q, searcher.dim, "query array")):
                rows.add(f"vector[{i}]", vector=vec)
        elif isinstance(q, (int, np.integer)) or (isinstance(q, str) and q.startswith("id:")):
            try:
                qid = parse_id(q[3:] if isinstance(q, str) else q)
            except UniretError:
                raise UsageError(f"QUERY {q!r}: expected id:<integer>, a stored id in 0..{MAX_ID}") from None
            rows.add(f"id:{qid}", stored_id=qid)
        elif isinstance(q, (str, Path)):
            _add_path(rows, str(q), searcher.dim, draft)
        else:
            raise UniretError(f"query of type {type(q).__name__}: use an image path, PIL image, bytes, id or array")
    wanted = [i for i in rows.ids if i is not None]
    if wanted:
        found = searcher.rows_of(wanted) >= 0
        if not found.all():
            missing = [i for i, ok in zip(wanted, found) if not ok]
            raise UnknownIdError(f"id {missing[0]} is not in the index" +
                                 (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        stored = searcher.vectors_for(wanted)
        at = iter(stored)
        rows.vectors = [next(at) if i is not None else v for i, v in zip(rows.ids, rows.vectors)]
    if not rows.labels:
        raise UniretError("no query could be read (every image was skipped)")
    return rows
