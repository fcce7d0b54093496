"""A small, deterministic, procedurally drawn UnED-style collection for tests and the quick start.

Four visually unrelated domains; in each, a class is an *identity* (one shape, glyph, texture or
flag design) and its images are renderings of it under different pose, scale, colour, background
and noise. Classes are split by identity into train / val / test, as in UnED: train class ids are
0..C-1, val and test classes continue after them. Two domains have a separate ``index`` split (the
test split holds the queries), two evaluate queries against themselves.

Everything derives from ``seed`` through per-image generators, so the output is byte-identical for
the same seed and options.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..guards import claim_output, has_format, in_range
from ..utils import atomic_write_text, publish_dir, scratch_dir

SIZE = 64  # pixels of the written images
_SS = 2  # supersampling factor when drawing

PALETTE = np.array(
    [
        (200, 30, 40), (240, 200, 20), (20, 120, 60), (20, 60, 170), (250, 250, 250), (15, 15, 15),
        (240, 120, 20), (120, 40, 150), (40, 170, 220), (150, 90, 40),
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    train_classes: int
    val_classes: int
    test_classes: int
    train_images: int  # images per train class
    eval_images: int  # images per val/test class
    separate_index: bool  # test = queries, index = the rest


DOMAINS = (
    DomainSpec("shapes", 32, 6, 16, 6, 6, separate_index=True),
    DomainSpec("glyphs", 48, 6, 16, 5, 5, separate_index=False),
    DomainSpec("textures", 16, 4, 10, 8, 6, separate_index=False),
    DomainSpec("flags", 24, 5, 12, 6, 6, separate_index=True),
)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light or mid-grey background with a soft gradient."""
    base = rng.uniform(150, 245, size=3)
    grad = rng.uniform(-25, 25, size=3)
    t = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
    axis = rng.integers(2)
    img = base[None, None, :] + grad[None, None, :] * (t if axis else t.transpose(1, 0, 2))
    return np.clip(np.broadcast_to(img, (size, size, 3)), 0, 255).astype(np.float32)


def _finish(canvas: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    img = canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    arr = arr + rng.normal(0, noise, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _paste_sprite(sprite: Image.Image, bg: np.ndarray, rng: np.random.Generator, rot: float, scale: tuple) -> Image.Image:
    """Rotate, scale and shift an RGBA sprite onto a background."""
    big = SIZE * _SS
    s = rng.uniform(*scale)
    sprite = sprite.rotate(float(rng.uniform(-rot, rot)), resample=Image.Resampling.BICUBIC, expand=True)
    side = max(8, int(big * s))
    sprite = sprite.resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.fromarray(bg.astype(np.uint8)).resize((big, big))
    max_shift = int(0.1 * big)
    x = (big - side) // 2 + int(rng.integers(-max_shift, max_shift + 1))
    y = (big - side) // 2 + int(rng.integers(-max_shift, max_shift + 1))
    canvas.paste(sprite, (x, y), sprite)
    return canvas


# -- domain renderers: identity parameters from (seed, domain, class), pose from the image rng ----

def _shape_identity(rng: np.random.Generator) -> dict:
    k = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * math.pi, k))
    radii = rng.uniform(0.45, 1.0, k)
    cols = PALETTE[rng.choice(len(PALETTE), 2, replace=False)]
    return {"angles": angles, "radii": radii, "c1": cols[0], "c2": cols[1],
            "stripe_angle": rng.uniform(0, math.pi), "stripe_freq": int(rng.integers(2, 6))}


def _render_shape(p: dict, rng: np.random.Generator) -> Image.Image:
    n = SIZE * _SS
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    phase = (xx * math.cos(p["stripe_angle"]) + yy * math.sin(p["stripe_angle"])) * p["stripe_freq"]
    stripes = (np.sin(2 * math.pi * phase) > 0)[..., None]
    jitter = rng.uniform(-20, 20, 3)
    fill = np.where(stripes, p["c1"] + jitter, p["c2"] + jitter)
    mask = Image.new("L", (n, n), 0)
    pts = [(n / 2 + 0.48 * n * r * math.cos(a), n / 2 + 0.48 * n * r * math.sin(a)) for a, r in zip(p["angles"], p["radii"])]
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    sprite = Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8)).convert("RGBA")
    sprite.putalpha(mask)
    return _finish(_paste_sprite(sprite, _background(rng, SIZE), rng, 35, (0.6, 0.95)), rng, rng.uniform(0, 8))


def _glyph_identity(rng: np.random.Generator) -> dict:
    grid = [(x, y) for x in range(4) for y in range(4)]
    strokes = []
    for _ in range(int(rng.integers(3, 6))):
        a, b = rng.choice(len(grid), 2, replace=False)
        strokes.append((grid[a], grid[b]))
    dots = [grid[i] for i in rng.choice(len(grid), int(rng.integers(0, 2)), replace=False)]
    return {"strokes": strokes, "dots": dots}


def _render_glyph(p: dict, rng: np.random.Generator) -> Image.Image:
    n = SIZE * _SS
    sprite = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)
    ink = tuple(int(v) for v in rng.uniform(0, 90, 3)) + (255,)
    width = int(rng.integers(5, 12))
    shear = rng.uniform(-0.2, 0.2)

    def pt(g):
        x, y = 0.18 * n + g[0] * 0.21 * n, 0.18 * n + g[1] * 0.21 * n
        return (x + shear * (y - n / 2), y)

    for a, b in p["strokes"]:
        draw.line([pt(a), pt(b)], fill=ink, width=width)
    for d in p["dots"]:
        x, y = pt(d)
        draw.ellipse([x - width, y - width, x + width, y + width], fill=ink)
    return _finish(_paste_sprite(sprite, _background(rng, SIZE), rng, 12, (0.8, 1.0)), rng, rng.uniform(0, 6))


def _texture_identity(rng: np.random.Generator) -> dict:
    return {
        "thetas": rng.uniform(0, math.pi, 2),
        "freqs": rng.uniform(3, 11, 2),
        "cols": PALETTE[rng.choice(len(PALETTE), 2, replace=False)],
        "blob": bool(rng.random() < 0.5),
    }


def _render_texture(p: dict, rng: np.random.Generator) -> Image.Image:
    n = SIZE * _SS
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    rot = rng.uniform(-0.25, 0.25)
    scale = rng.uniform(0.85, 1.15)
    field = np.zeros((n, n), np.float32)
    for theta, freq in zip(p["thetas"], p["freqs"]):
        t = theta + rot
        proj = xx * math.cos(t) + yy * math.sin(t)
        field += np.sin(2 * math.pi * (freq * scale * proj + rng.uniform(0, 1)))
    if p["blob"]:
        field = np.sign(field) * np.abs(field) ** 0.5
    w = ((field - field.min()) / (np.ptp(field) + 1e-6))[..., None]
    img = p["cols"][0] * w + p["cols"][1] * (1 - w) + rng.uniform(-20, 20, 3)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return _finish(canvas, rng, rng.uniform(2, 10))


def _flag_identity(rng: np.random.Generator) -> dict:
    bands = int(rng.integers(2, 5))
    idx = [int(rng.integers(len(PALETTE)))]
    while len(idx) < bands:
        c = int(rng.integers(len(PALETTE)))
        if c != idx[-1]:
            idx.append(c)
    emblem = ["none", "circle", "square", "cross", "triangle"][int(rng.integers(5))]
    return {"colors": PALETTE[idx], "vertical": bool(rng.random() < 0.5), "emblem": emblem,
            "emblem_color": PALETTE[int(rng.integers(len(PALETTE)))]}


def _render_flag(p: dict, rng: np.random.Generator) -> Image.Image:
    n = SIZE * _SS
    w, h = n, int(n * 0.66)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    amp, freq, ph = rng.uniform(0, 0.05 * h), rng.uniform(1, 2.5), rng.uniform(0, 2 * math.pi)
    coord = (xx / w) if p["vertical"] else ((yy + amp * np.sin(2 * math.pi * freq * xx / w + ph)) / h)
    band = np.clip((coord * len(p["colors"])).astype(int), 0, len(p["colors"]) - 1)
    img = Image.fromarray(np.clip(p["colors"][band], 0, 255).astype(np.uint8)).convert("RGBA")
    draw = ImageDraw.Draw(img)
    ec = tuple(int(v) for v in p["emblem_color"]) + (255,)
    cx, cy, r = w * 0.3, h * 0.5, h * 0.22
    if p["emblem"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ec)
    elif p["emblem"] == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=ec)
    elif p["emblem"] == "cross":
        draw.rectangle([0, cy - r / 3, w, cy + r / 3], fill=ec)
        draw.rectangle([cx - r / 3, 0, cx + r / 3, h], fill=ec)
    elif p["emblem"] == "triangle":
        draw.polygon([(0, 0), (0, h), (w * 0.4, h / 2)], fill=ec)
    sprite = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    sprite.paste(img, (0, (n - h) // 2))
    return _finish(_paste_sprite(sprite, _background(rng, SIZE), rng, 10, (0.75, 1.0)), rng, rng.uniform(0, 6))


RENDERERS = {
    "shapes": (_shape_identity, _render_shape),
    "glyphs": (_glyph_identity, _render_glyph),
    "textures": (_texture_identity, _render_texture),
    "flags": (_flag_identity, _render_flag),
}


def _write_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False, compress_level=6)


FORMAT = "uniret-demo-collection/1"


def is_demo_collection(path: Path) -> bool:
    """A collection that :func:`make_demo` wrote (its summary.json says so)."""
    return has_format(path, "summary.json", FORMAT.split("/")[0])


def make_demo(out: str | Path, seed: int = 0, scale: float = 1.0, overwrite: bool = False) -> dict:
    """Write the demo collection to ``out`` (a new or empty directory, or with ``overwrite`` an earlier
    demo collection, replaced atomically); returns a summary.

    ``scale`` multiplies every domain's class counts (at least 2 classes per split).
    """
    in_range(seed, "--seed", 0, 2**32 - 1)
    in_range(scale, "--scale", 0, 64, low_open=True)
    out = Path(out)
    with claim_output(out, "demo collection", is_demo_collection, overwrite=overwrite, option="OUT"), scratch_dir(out) as tmp:
        summary = _draw(tmp, seed, scale)
        publish_dir(tmp, out)
    return summary


def _draw(tmp: Path, seed: int, scale: float) -> dict:
    summary: dict = {"format": FORMAT, "seed": seed, "scale": scale, "size": SIZE, "domains": {}}
    for d_idx, spec in enumerate(DOMAINS):
        identity_fn, render_fn = RENDERERS[spec.name]
        counts = [max(2, round(c * scale)) for c in (spec.train_classes, spec.val_classes, spec.test_classes)]
        splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
        if spec.separate_index:
            splits["index"] = []
        class_id = 0
        for split, n_classes in zip(("train", "val", "test"), counts):
            per_class = spec.train_images if split == "train" else spec.eval_images
            for _ in range(n_classes):
                ident = identity_fn(_rng(seed, d_idx, class_id, 10**6))
                for j in range(per_class):
                    img = render_fn(ident, _rng(seed, d_idx, class_id, j))
                    rel = f"{spec.name}/{class_id:04d}/{j:02d}.png"
                    _write_png(img, tmp / "images" / rel)
                    target = split
                    if split == "test" and spec.separate_index and j >= 2:
                        target = "index"  # two queries per test class, the rest is the index
                    splits[target].append({"path": rel, "class_id": class_id})
                class_id += 1
        for split, records in splits.items():
            body = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
            atomic_write_text(tmp / "info" / spec.name / f"{split}.json", body)
        summary["domains"][spec.name] = {s: len(r) for s, r in splits.items()}
    atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
