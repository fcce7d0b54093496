"""Plain CNNs as a backbone source: ``plain:cnn6`` (issue #13's 6-conv baseline, 1.13M parameters).

Six 3x3 conv-BN-ReLU units (widths 32, 64, 128, 128, 256, 256) with 2x2 max-pooling after units 1,
2, 4 and 5, and global average pooling: 256-d features. Stages are the six units (an
``nn.Sequential``), so ``--train-blocks`` can cut it like any CNN. Random init only (no weights
ship); input statistics are ImageNet's and the default input 64 px, as in the plain recipe.
"""

from __future__ import annotations

from torch import nn

from ..errors import UniretError

ARCHS = {
    "cnn6": ([32, 64, 128, 128, 256, 256], {0, 1, 3, 4}),
}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def plain_cnn(widths: list[int], pool_after: set[int]) -> nn.Sequential:
    units, c_in = [], 3
    for i, c_out in enumerate(widths):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if i in pool_after:
            layers.append(nn.MaxPool2d(2))
        units.append(nn.Sequential(*layers))
        c_in = c_out
    return nn.Sequential(*units)


class PlainNet(nn.Module):
    """The stages (``features``, an ``nn.Sequential``) then global average pooling."""

    def __init__(self, widths: list[int], pool_after: set[int]):
        super().__init__()
        self.features = plain_cnn(widths, pool_after)
        self.num_features = widths[-1]

    def forward(self, x):
        return self.features(x).mean(dim=(-2, -1))


def build_plain(name: str, arch: str, *, pretrained: bool, weights, image_size: int | None, pool: str | None):
    from .backbone_module import Backbone

    if arch not in ARCHS:
        raise UniretError(f"unknown plain architecture {arch!r}; known: {', '.join(f'plain:{a}' for a in ARCHS)}")
    if pretrained or weights:
        raise UniretError(f"{name}: no weights exist for plain CNNs; drop --pretrained/--weights")
    if pool is not None:
        raise UniretError(f"{name}: plain CNNs average-pool; drop --pool")
    size = int(image_size or 64)
    model = PlainNet(*ARCHS[arch])
    data_config = {"input_size": [3, size, size], **IMAGENET, "interpolation": "bicubic", "crop_pct": 1.0,
                   "crop_mode": "center"}
    return Backbone(name, model, model.num_features, data_config)
