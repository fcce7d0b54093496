"""Backbones through one factory: ``timm:<model>[.<tag>]`` or ``open_clip:<arch>[/<pretrained>]``
(``uniret.embed.model.build_model`` also takes a uniret model directory's backbone).

Every backbone answers ``forward(x) -> (N, feature_dim)`` and carries its own preprocessing in
``data_config`` (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``),
so the model directory can store it and embedding and training can never disagree on it.

Features follow the UDON reference: for ViTs the CLS token after the final norm; for open_clip
ViTs the pooled token *before* CLIP's output projection (768-d for ViT-B/16); for CNNs the pooled
map (timm's pooling, or GeM with ``pool="gem"`` (p learnable, starts at 3) / ``pool="gem:4.6"``
(p fixed)).
"""

from __future__ import annotations

import difflib
import os
import socket
import urllib.parse
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UniretError

SOURCES = ("timm", "open_clip")


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
    """A feature extractor: ``forward(x) -> (N, feature_dim)`` plus its preprocessing."""

    def __init__(self, name: str, model: nn.Module, feature_dim: int, data_config: dict,
                 pool: nn.Module | None = None):
        super().__init__()
        self.name = name
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


def split_name(name: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ("timm", "resnet50"); a name without a known prefix is refused with a hint."""
    source, sep, rest = name.partition(":")
    if sep and source in SOURCES and rest:
        return source, rest
    hints = []
    try:
        import timm

        base = name.split(".")[0]
        if timm.list_models(base) or timm.list_models(base, pretrained=True):
            hints.append(f"timm:{name}")
    except ImportError:
        pass
    try:
        import open_clip

        if name.split("/")[0] in open_clip.list_models():
            hints.append(f"open_clip:{name}")
    except ImportError:
        pass
    hint = f"did you mean {' or '.join(hints)}?" if hints else "e.g. timm:vit_small_patch16_224 or open_clip:ViT-B-16/openai"
    raise UniretError(
        f"backbone {name!r}: name it with a source prefix (timm:<model>, open_clip:<arch>[/<pretrained>]) "
        f"or give a uniret model directory; {hint}"
    )


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


def _timm_backbone(name: str, model_name: str, pretrained: bool, weights: str | None, image_size: int | None,
                   pool: str | None) -> Backbone:
    import timm
    from timm.data import resolve_model_data_config

    arch = model_name.split(".")[0]
    if not timm.is_model(arch):
        raise UniretError(f"unknown timm model {arch!r}; close matches: {_close(arch, timm.list_models())}")
    global_pool, gem_p, gem_learnable = parse_pool(pool)
    kwargs: dict = {"num_classes": 0}
    if global_pool == "gem":
        kwargs["global_pool"] = ""  # keep the (N, C, H, W) map and pool it here
    elif global_pool is not None:
        kwargs["global_pool"] = global_pool
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    use_pretrained = bool(pretrained or weights)
    if pretrained and weights is None:
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
        if not use_pretrained:
            raise
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if weights is not None:  # a torch checkpoint is read with weights_only=True: a pickle is refused
            raise UniretError(f"{name}: cannot load --weights {weights} ({why}); give a safetensors file or a "
                              "plain state-dict checkpoint for this architecture") from None
        raise UniretError(
            f"{name}: cannot load pretrained weights ({why}); "
            "put them in the hub cache, pass --weights FILE, or drop --pretrained"
        ) from None
    cfg = resolve_model_data_config(model)
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
    gem = None
    if global_pool == "gem":
        probe = model(torch.zeros(1, *data_config["input_size"]))
        if probe.ndim != 4:
            raise UniretError(f"{name}: gem pooling needs a CNN feature map; for ViTs use pool token or avg")
        gem = GeM(gem_p, learnable=gem_learnable)
    # Models with a conv head after pooling (MobileNetV3/V4, LCNet, ...) output head_hidden_size.
    feature_dim = model.num_features if gem is not None else getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(name, model, feature_dim, data_config, pool=gem)


def _open_clip_backbone(name: str, spec: str, pretrained: bool, weights: str | None,
                        image_size: int | None, pool: str | None) -> Backbone:
    import open_clip

    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise UniretError(f"unknown open_clip architecture {arch!r}; close matches: {_close(arch, open_clip.list_models())}")
    if pool is not None:
        raise UniretError("--pool applies to timm backbones; open_clip backbones use their own pooled token")
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if tag and not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UniretError(f"unknown open_clip pretrained tag {tag!r} for {arch}; known: {', '.join(tags) or 'none'}")
    source = str(weights) if weights else (tag if pretrained and tag else None)
    if pretrained and not source:
        raise UniretError(f"{name}: --pretrained needs a tag (open_clip:{arch}/<tag>) or --weights FILE")
    if source is not None and weights is None:
        offline_unless_reachable()
    try:
        clip = open_clip.create_model(
            arch, pretrained=source, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_image_size=image_size, require_pretrained=source is not None,
        )
    except Exception as exc:  # noqa: BLE001 - hub, network and checkpoint errors all mean "no weights"
        if source is None:
            raise
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
    return Backbone(name, visual, int(feature_dim), data_config)


def create_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None,
                    image_size: int | None = None, pool: str | None = None) -> Backbone:
    """Build a backbone by source-prefixed name (a uniret model directory's backbone is built by
    ``uniret.embed.model.build_model``, the factory above both).

    ``pretrained`` loads weights through timm / open_clip (hub cache); ``weights`` loads a local
    file instead; by default the architecture gets random weights. ``image_size`` overrides the
    input size (timm's ``img_size`` for ViTs, open_clip's ``force_image_size``).
    """
    name = str(name)
    if image_size is not None and int(image_size) <= 0:
        raise UniretError(f"--image-size must be a positive number of pixels, not {image_size}")
    if weights is not None and not Path(weights).is_file():
        raise UniretError(f"--weights {weights}: no such file")
    source, spec = split_name(name)
    build = _timm_backbone if source == "timm" else _open_clip_backbone
    return build(name, spec, pretrained, weights, image_size, pool)

