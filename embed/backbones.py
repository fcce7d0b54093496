"""Backbones through one factory and one registry of sources: ``timm:<model>[.<tag>]``,
``timm:hf-hub:<org>/<name>``, ``timm:local-dir:<path>``, ``open_clip:<arch>[/<pretrained>]``,
``open_clip:hf-hub:<org>/<name>``, ``open_clip:local-dir:<path>``, and whatever other packages
register under the ``uniret.backbones`` entry-point group (``uniret.embed.model.build_model`` also
takes a uniret model directory's backbone).

Every backbone answers ``forward(x) -> (N, feature_dim)`` and carries its own preprocessing in
``data_config`` (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``),
so the model directory can store it and embedding and training can never disagree on it.

Features follow the UDON reference: for ViTs the CLS token after the final norm; for open_clip
ViTs the pooled token *before* CLIP's output projection (768-d for ViT-B/16); for CNNs the pooled
map (timm's pooling, or GeM with ``pool="gem"`` (p learnable, starts at 3) / ``pool="gem:4.6"``
(p fixed)).

``--pretrained`` for a plain timm name looks first for weights that an installed package ships
(:mod:`uniret.embed.weights`, offline), then in the hub (its local cache when offline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UniretError
from . import plain, sources
from .backbone_module import Backbone, GeM, parse_pool
from .plugins import Registry

__all__ = ["BACKBONE_SOURCES", "SOURCES", "Backbone", "BackboneSource", "GeM", "create_backbone", "get_source",
           "parse_pool", "split_name"]


# -- the registry of sources -----------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSource:
    """A registered backbone source.

    ``build(name, spec, *, pretrained, weights, image_size, pool) -> Backbone`` makes ``<source>:<spec>``
    (``name`` is the whole name; ``weights`` an existing file or None; ``image_size`` and ``pool`` None
    for the backbone's own) and raises :class:`~uniret.errors.UniretError` for what it cannot make.
    ``summary`` says in one line what the source is, ``syntax`` how its names are written, and
    ``owns(bare_name)``, optional, whether a name given without a prefix is one of its own (the hint).
    """

    build: Callable[..., Backbone]
    summary: str
    syntax: str
    owns: Callable[[str], bool] | None = None


#: Every backbone source by name: the built-in ``timm`` and ``open_clip`` below, then the sources other
#: packages register under the ``uniret.backbones`` entry-point group (imported when first used). A new
#: built-in source is a build function plus one ``register`` call here (and its tests).
BACKBONE_SOURCES: Registry[BackboneSource] = Registry("uniret.backbones", BackboneSource, "backbone source")
#: The source names, as a mapping (``"timm" in SOURCES``); the same object as :data:`BACKBONE_SOURCES`.
SOURCES = BACKBONE_SOURCES


def get_source(source: str) -> BackboneSource:
    """The registered source ``source``; a one-line error naming the known ones otherwise."""
    try:
        return BACKBONE_SOURCES[source]
    except KeyError:
        raise UniretError(f"unknown backbone source {source!r} (a plugin that failed to load is named in a warning "
                          f"above); known: {', '.join(BACKBONE_SOURCES)}") from None


def split_name(name: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ("timm", "resnet50"); a name without a known prefix is refused with a hint."""
    source, sep, rest = name.partition(":")
    if sep and rest and source in BACKBONE_SOURCES:
        return source, rest
    sources = {}
    for known in list(BACKBONE_SOURCES):
        try:
            sources[known] = BACKBONE_SOURCES[known]
        except KeyError:  # a broken plugin (already a warning)
            pass
    hints = []
    for known, record in sources.items():
        try:
            if record.owns is not None and record.owns(name):
                hints.append(f"{known}:{name}")
        except Exception:  # noqa: BLE001 - a hint is optional; a failing one must not hide the error
            pass
    hint = f"did you mean {' or '.join(hints)}?" if hints else "e.g. timm:vit_small_patch16_224 or open_clip:ViT-B-16/openai"
    syntax = ", ".join(record.syntax.split(" | ")[0] for record in sources.values())
    if sep and rest and source.isidentifier():
        raise UniretError(f"backbone {name!r}: unknown source prefix {source!r} (known: {', '.join(sources)}; a package "
                          "adds one through the uniret.backbones entry points)")
    raise UniretError(f"backbone {name!r}: name it with a source prefix ({syntax}) or give a uniret model directory; {hint}")


BACKBONE_SOURCES.register("timm", BackboneSource(
    sources.timm_backbone, "timm image models (random, hub or package weights)",
    "timm:<model>[.<tag>] | timm:hf-hub:<org>/<name> | timm:local-dir:<path>", sources.timm_owns))
BACKBONE_SOURCES.register("open_clip", BackboneSource(
    sources.open_clip_backbone, "open_clip image towers (CLIP, SigLIP, ...)",
    "open_clip:<arch>[/<pretrained>] | open_clip:hf-hub:<org>/<name> | open_clip:local-dir:<path>", sources.open_clip_owns))
BACKBONE_SOURCES.register("plain", BackboneSource(
    plain.build_plain, "plain CNNs trained from scratch (cnn6: the 6-conv baseline of issue #13)",
    "plain:cnn6", lambda bare: bare in plain.ARCHS))


def create_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None,
                    image_size: int | None = None, pool: str | None = None) -> Backbone:
    """Build a backbone by source-prefixed name (a uniret model directory's backbone is built by
    ``uniret.embed.model.build_model``, the factory above both).

    ``pretrained`` loads weights (timm: an installed weights package first, then the hub cache);
    ``weights`` loads a local file instead; by default the architecture gets random weights.
    ``image_size`` overrides the input size (timm's ``img_size`` for ViTs, open_clip's ``force_image_size``).
    """
    name = str(name)
    if image_size is not None and int(image_size) <= 0:
        raise UniretError(f"--image-size must be a positive number of pixels, not {image_size}")
    if weights is not None and not Path(weights).is_file():
        raise UniretError(f"--weights {weights}: no such file")
    source, spec = split_name(name)
    backbone = get_source(source).build(name, spec, pretrained=bool(pretrained),
                                        weights=str(weights) if weights is not None else None,
                                        image_size=image_size, pool=pool)
    if not isinstance(backbone, Backbone):
        raise UniretError(f"backbone source {source!r} gave a {type(backbone).__name__}, not a "
                          "uniret.embed.backbones.Backbone; fix or uninstall the plugin")
    return backbone
