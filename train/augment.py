"""Training augmentation as a small declarative spec, settable per domain (issue #13).

A spec is a JSON object; missing keys take these defaults (the reference augmentation)::

    crop          "reference": squash-resize to 256/224 of the input size, random crop (METHOD.md §3)
                  "rrc": random-resized crop (timm's RandomResizedCropAndInterpolation)
    scale         [min, max] area fraction of the rrc crop          default [0.08, 1.0]
    ratio         [min, max] aspect ratio of the rrc crop           default [0.75, 1.3333]
    hflip         probability of a horizontal flip                  default 0.5
    color_jitter  brightness/contrast/saturation strength, 0 = off  default 0.0
    auto_augment  a timm RandAugment/AutoAugment string, e.g. "rand-m7-mstd0.5" (rrc only), or null
    rotate        largest rotation in degrees of a random affine warp, 0 = off        default 0
    translate     largest shift of that warp, a fraction of the side                  default 0.0
    fill          grey level (0-255) the warp fills in with (255: a white page)       default 255
    blur          probability of a Gaussian blur, sigma 0.1-1.5 px                   default 0.0
    jpeg          probability of a JPEG re-encoding at quality 50-90                  default 0.0

The last five are query-side distortions (a photo of a page, a re-sent screenshot): applied to the
source image, in that order, before the crop, as the query distortions of copy-detection and
instance-retrieval benchmarks are. The warp is torchvision's ``RandomAffine``, the re-encoding its
``JPEG``, the blur Pillow's ``GaussianBlur`` (torchvision's is ~50x slower on a PIL image).

``TrainConfig.augment`` is the spec of every domain and ``TrainConfig.augment_domains`` overrides
keys per domain, e.g. flips off for glyphs, flags and cards whose mirror image is another identity
or none: ``{"augment": {"hflip": 0.0}, "augment_domains": {"icons": {"hflip": 0.5}}}``. "rrc" specs
are built by timm's ``create_transform``; "reference" specs by ``embed.preprocess.train_transform``
with torchvision's flip and colour jitter in front. This module imports torch only to build.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UsageError

DEFAULT_SPEC: dict = {"crop": "reference", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.5,
                      "color_jitter": 0.0, "auto_augment": None, "rotate": 0.0, "translate": 0.0, "fill": 255,
                      "blur": 0.0, "jpeg": 0.0}
CROPS = ("reference", "rrc")


def check_spec(spec: dict, where: str = "augment") -> None:
    """Raise a one-line error for an unknown key or a value out of range."""
    if not isinstance(spec, dict):
        raise UsageError(f"{where} must be a JSON object of augmentation settings, not {spec!r}")
    unknown = sorted(set(spec) - set(DEFAULT_SPEC))
    if unknown:
        raise UsageError(f"{where}: unknown augmentation key(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_SPEC)}")
    full = {**DEFAULT_SPEC, **spec}
    if full["crop"] not in CROPS:
        raise UsageError(f"{where}: crop must be one of {', '.join(CROPS)}, not {full['crop']!r}")
    for key, low, high in (("scale", 0.0, 1.0), ("ratio", 0.0, float("inf"))):
        pair = full[key]
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair))
        if not ok or not low < pair[0] <= pair[1] <= high:
            raise UsageError(f"{where}: {key} must be [min, max] with {low} < min <= max <= {high}, not {pair!r}")
    for key, high in (("hflip", 1.0), ("color_jitter", 1.0), ("rotate", 180.0), ("translate", 0.5), ("fill", 255),
                      ("blur", 1.0), ("jpeg", 1.0)):
        value = full[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
            raise UsageError(f"{where}: {key} must be a number in [0, {high}], not {value!r}")
    if full["fill"] != int(full["fill"]):
        raise UsageError(f"{where}: fill must be a whole grey level in [0, 255], not {full['fill']!r}")
    if full["auto_augment"] is not None and (not isinstance(full["auto_augment"], str) or full["crop"] != "rrc"):
        raise UsageError(f"{where}: auto_augment takes a timm augmentation string and crop \"rrc\"")


def domain_specs(augment: dict, augment_domains: dict, domains: list[str]) -> list[dict]:
    """The full spec of each training domain (defaults < ``augment`` < the domain's overrides)."""
    unknown = sorted(set(augment_domains) - set(domains))
    if unknown:
        raise UsageError(f"augment_domains names {', '.join(unknown)}, not training domain(s): {', '.join(domains)}")
    return [{**DEFAULT_SPEC, **augment, **augment_domains.get(d, {})} for d in domains]


class RandomBlur:
    """Pillow's Gaussian blur with probability ``p`` and sigma drawn from ``sigma`` (torch's RNG)."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 1.5)):
        self.p, self.sigma = p, sigma

    def __call__(self, image):
        import torch
        from PIL import ImageFilter

        if torch.rand(()) >= self.p:
            return image
        low, high = self.sigma
        return image.filter(ImageFilter.GaussianBlur(low + (high - low) * float(torch.rand(()))))

    def __repr__(self) -> str:
        return f"RandomBlur(p={self.p}, sigma={self.sigma})"


def distortions(spec: dict) -> list[Callable]:
    """The query-side distortions of ``spec`` (warp, blur, JPEG), as PIL -> PIL transforms."""
    from torchvision.transforms import v2

    out: list[Callable] = []
    if spec["rotate"] or spec["translate"]:
        shift = float(spec["translate"])
        out.append(v2.RandomAffine(float(spec["rotate"]), translate=(shift, shift) if shift else None,
                                   interpolation=v2.InterpolationMode.BILINEAR, fill=int(spec["fill"])))
    if spec["blur"]:
        out.append(RandomBlur(float(spec["blur"])))
    if spec["jpeg"]:
        out.append(v2.RandomApply([v2.JPEG((50, 90))], p=float(spec["jpeg"])))
    return out


def build_transform(preprocess: dict, spec: dict) -> Callable:
    """PIL image -> normalised (3, H, W) tensor, augmented as ``spec`` says (a full spec)."""
    from torchvision import transforms as T

    front = distortions(spec)
    rest = _crop_transform(preprocess, spec)
    return T.Compose([*front, rest]) if front else rest


def _crop_transform(preprocess: dict, spec: dict) -> Callable:
    from torchvision import transforms as T

    from ..embed.preprocess import train_transform

    if spec["crop"] == "rrc":
        from timm.data import create_transform

        return create_transform(
            tuple(preprocess["input_size"]), is_training=True, scale=tuple(spec["scale"]), ratio=tuple(spec["ratio"]),
            hflip=float(spec["hflip"]), vflip=0.0, color_jitter=float(spec["color_jitter"]) or None,
            auto_augment=spec["auto_augment"], interpolation=preprocess.get("interpolation", "bicubic"),
            mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]), re_prob=0.0,
        )
    if spec["hflip"] == DEFAULT_SPEC["hflip"] and not spec["color_jitter"]:
        return train_transform(preprocess)  # exactly the reference pipeline
    front = []
    if spec["color_jitter"]:
        front.append(T.ColorJitter(*(3 * [float(spec["color_jitter"])])))
    if spec["hflip"]:
        front.append(T.RandomHorizontalFlip(float(spec["hflip"])))
    return T.Compose([*front, train_transform(preprocess, hflip=False)])
