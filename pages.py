"""Self-contained HTML pages (search results, near-duplicate groups) rendered with Jinja2.

Every page is generated from a template in ``templates/`` by an environment that autoescapes, so
a ``<script>`` in a path, domain or query label renders as text; thumbnails are embedded as
``data:`` URIs, so a page needs no server and no network. :func:`thumbnail` and :func:`render` are
the shared pieces for any page uniret writes (the evaluation report can use them too).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
from functools import cache
from pathlib import Path

logger = logging.getLogger("uniret")

THUMB = 96  # pixels of the longer side of a thumbnail


@cache
def environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["score"] = format_score
    return env


#: In the head of every page (templates/base.html): how a command recognises a page it may replace.
GENERATOR = b'<meta name="generator" content="uniret">'
#: Which page it is: a command replaces only a page of its own kind (search results never replace
#: an evaluation report). Pages written before the kind was recorded carry none and are not replaced.
PAGE_KINDS = {"results.html": "search", "duplicates.html": "dedup", "report.html": "report"}


def page_kind(path: Path) -> str | None:
    """The kind of a page that uniret wrote (``search``, ``dedup``, ``report``), ``""`` for a page of
    uniret's without a recorded kind, None for anything else (or a file that is not a regular one)."""
    import re
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = f.read(4096)
    if GENERATOR not in head:
        return None
    found = re.search(rb'<meta name="uniret-page" content="([a-z]+)">', head)
    return found.group(1).decode() if found else ""


def is_page(path: Path, kind: str | None = None) -> bool:
    """A page that uniret wrote (its head carries :data:`GENERATOR`), of ``kind`` when given."""
    found = page_kind(path)
    return found is not None and (kind is None or found == kind)


def render(template: str, **context) -> str:
    """Render ``templates/<template>`` with autoescaping (pages record their kind, :data:`PAGE_KINDS`)."""
    return environment().get_template(template).render(page_kind=PAGE_KINDS.get(template, ""), **context)


def format_score(value) -> str:
    """A similarity for display: clipped to [-1, 1] (fp16 vectors can give 1.0001), 3 decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{min(1.0, max(-1.0, float(value))):.3f}"


def thumbnail(image, size: int = THUMB) -> str | None:
    """A small JPEG ``data:`` URI of encoded image bytes or a PIL image; None if it cannot be decoded."""
    from .data.images import decode_image
    from .errors import ImageDecodeError

    try:
        img = decode_image(image) if isinstance(image, (bytes, bytearray)) else image.convert("RGB")
    except ImageDecodeError:
        return None
    img = img.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def item_thumbnail(images, item: dict | None) -> str | None:
    """The thumbnail of a stored item from an image source (None without a source or an image)."""
    from .errors import UniretError

    if images is None or item is None:
        return None
    try:
        return thumbnail(images.get(item))
    except UniretError as exc:
        logger.debug("no thumbnail for item %s: %s", item.get("id"), exc)
        return None


def render_results(results, title: str = "uniret search", fragment: bool = False) -> str:
    """The page (or, for a notebook, the fragment) of a :class:`~uniret.index.api.Results`."""
    queries = []
    for q in results:
        thumb = thumbnail(q.image) if q.image is not None else item_thumbnail(results.images, q.item)
        hits = [dict(row, thumb=item_thumbnail(results.images, row)) for row in q.rows]
        queries.append({"label": q.query, "thumb": thumb, "hits": hits})
    return render("results_fragment.html" if fragment else "results.html", title=title, queries=queries,
                  has_images=results.images is not None, inline_css=fragment)


def render_duplicates(res: dict, meta: dict, similarity: dict, images, title: str = "uniret dedup") -> str:
    """The page of ``uniret dedup``: one row per group, the kept item first."""
    keep = set(res["keep"])
    groups = [[{**(meta.get(i) or {"id": i}), "id": i, "keep": i in keep, "similarity": similarity.get(i),
                "thumb": item_thumbnail(images, meta.get(i))} for i in g] for g in res["groups"]]
    return render("duplicates.html", title=title, groups=groups, threshold=res["threshold"],
                  removed=len(res["remove"]), has_images=images is not None)
