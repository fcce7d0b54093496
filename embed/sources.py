"""The built-in backbone sources, ``timm`` and ``open_clip`` (registered in :mod:`.backbones`; they
import their library when first used).

Both honour their library's own offline names: ``hf-hub:<org>/<name>`` (the hub cache works offline)
and ``local-dir:<folder>`` (timm: ``config.json`` + ``model.safetensors`` as ``save_for_hf`` writes;
open_clip: ``open_clip_config.json`` + its weights). For a plain timm name, ``--pretrained`` takes
weights an installed package ships (:mod:`.weights`) before it tries the hub.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import warnings
from pathlib import Path

import torch

from ..errors import UniretError
from .backbone_module import Backbone, GeM, close_matches, one_line, parse_pool

HUB_PREFIXES = ("hf-hub", "local-dir")


def split_hub(name: str, spec: str) -> tuple[str | None, str]:
    """``"hf-hub:org/name"`` -> ("hf-hub", "org/name"); a plain name -> (None, name)."""
    prefix, sep, rest = spec.partition(":")
    prefix = "hf-hub" if prefix == "hf_hub" else prefix  # timm's old spelling
    if sep and prefix in HUB_PREFIXES and rest:
        return prefix, rest
    if sep:
        raise UniretError(f"{name}: after the source, write a model name, hf-hub:<org>/<name> or local-dir:<folder>")
    return None, spec


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
def timm_backbone(name: str, model_name: str, *, pretrained: bool, weights: str | None, image_size: int | None,
                  pool: str | None) -> Backbone:
    import timm
    from timm.data import resolve_model_data_config

    from .weights import apply_weights, find_weights, no_weights_message

    hub, model_id = split_hub(name, model_name)  # timm's own "hf-hub:" / "local-dir:" names
    arch, _, tag = (model_name, "", "") if hub else model_id.partition(".")
    if hub is None and not timm.is_model(arch):
        raise UniretError(f"unknown timm model {arch!r}; close matches: {close_matches(arch, timm.list_models())}")
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
            raise UniretError(f"{name}: cannot load --weights {weights} ({one_line(exc)}); give a safetensors file or a "
                              "plain state-dict checkpoint for this architecture") from None
        if hub == "local-dir":
            raise UniretError(f"{name}: cannot read the model folder {model_id} ({one_line(exc)})") from None
        if _is_offline_error(exc) and hub == "hf-hub":
            raise UniretError(f"{name}: not in the hub cache on this machine (offline); fill the cache where the hub "
                              "is reachable, or save the model to a folder and use timm:local-dir:<folder>") from None
        if _is_offline_error(exc):
            raise UniretError(no_weights_message(name, arch)) from None
        if "No pretrained weights exist" in str(exc):
            raise UniretError(f"{name}: timm has no pretrained weights for {arch}; pass --weights FILE "
                              "or drop --pretrained") from None
        raise UniretError(f"{name}: cannot load pretrained weights ({one_line(exc)}); "
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


def timm_owns(bare: str) -> bool:
    import timm

    base = bare.split(".")[0]
    return bool(timm.list_models(base) or timm.list_models(base, pretrained=True))


# -- open_clip ---------------------------------------------------------------------------------------
def open_clip_backbone(name: str, spec: str, *, pretrained: bool, weights: str | None,
                       image_size: int | None, pool: str | None) -> Backbone:
    import open_clip

    if pool is not None:
        raise UniretError("--pool applies to timm backbones; open_clip backbones use their own pooled token")
    hub, _ = split_hub(name, spec)
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
                              f"{close_matches(arch, open_clip.list_models())}")
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


def open_clip_owns(bare: str) -> bool:
    import open_clip

    return bare.split("/")[0] in open_clip.list_models()
