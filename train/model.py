"""The training-time model: the inference embedder plus the heads of the training method.

``TrainingModel`` wraps a :class:`~uniret.embed.model.UniversalEmbedder` (backbone + universal
student head, the only part exported for inference) and the heads that only training needs, which
the method builds (:mod:`uniret.train.methods`): teachers, per-domain or joint cosine classifiers.
The model computes e_b and the student embedding once; the method turns them into its outputs.

Heads live in ``nn.ModuleList``s indexed by domain position (domain names may contain dots).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_init(layer: nn.Linear) -> nn.Linear:
    """LeCun-normal weights (truncated, fan-in) and a zero bias: flax's ``nn.Dense`` default, as the
    reference's projection heads. PyTorch's default would give untrained embeddings a shared offset
    (mean pairwise cosine ~0.5 instead of ~0)."""
    from timm.layers import lecun_normal_

    lecun_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class CosineClassifier(nn.Module):
    """``z = normalize(W) x`` for an L2-normalised x: raw cosines to bias-free class prototypes."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        # LeCun-normal init, as the reference's (flax) dense layers; only directions matter.
        self.weight = nn.Parameter(torch.randn(num_classes, in_dim) / math.sqrt(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))

    def prefix(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Cosines of the re-normalised first ``size`` dimensions of x to the prototypes' first
        ``size`` dimensions (Matryoshka with tied weights, MRL-E): one classifier serves every prefix."""
        return F.linear(F.normalize(x[:, :size], dim=1), F.normalize(self.weight[:, :size], dim=1))


class Heads(nn.Module):
    """The usual training heads, per domain position: teacher projections, teacher classifiers and
    student classifiers (a method leaves the lists it does not use empty)."""

    def __init__(self):
        super().__init__()
        self.teacher_heads = nn.ModuleList()
        self.teacher_classifiers = nn.ModuleList()
        self.student_classifiers = nn.ModuleList()


class TrainingModel(nn.Module):
    """Backbone + student head (the embedder) + the method's heads."""

    def __init__(self, embedder: nn.Module, method, frozen: nn.Module | None = None, cached: nn.Module | None = None):
        super().__init__()
        self.embedder = embedder
        self.method = method  # a uniret.train.methods.TrainingMethod (not a module: it has no weights)
        self.heads = method.build_heads(embedder.head.in_features, embedder.head.out_features)
        # The frozen prefix of the backbone (uniret.train.frozen): always in eval mode, no gradients.
        # ``cached``: the rest of the backbone, which turns cached prefix outputs into features; when
        # set, forward() takes those outputs instead of images.
        self._frozen = [frozen] if frozen is not None else []  # a list: not registered twice
        self._cached = [cached] if cached is not None else []

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    @property
    def nested_dims(self) -> list[int]:
        return list(getattr(getattr(self.embedder, "config", None), "nested_dims", None) or [])

    def forward(self, images: torch.Tensor, domain: int) -> dict[str, torch.Tensor]:
        if self._cached:  # images are the frozen prefix's cached outputs
            features = F.normalize(self._cached[0](images), dim=-1)
        else:
            features = self.embedder.features(images)  # e_b, L2-normalised
        student = self.embedder.embed_features(features)  # e_u = normalize(head(e_b))
        return self.method.forward(self, features, student, domain)

    def head_parameters(self) -> list[nn.Parameter]:
        """Student head and every head of the method: the ``head_lr`` group."""
        return [*self.embedder.head.parameters(), *self.heads.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's trainable parameters (a frozen prefix's are left out of the optimiser)."""
        return [p for p in self.embedder.backbone.parameters() if p.requires_grad]

    def domain_parameters(self, domain: int) -> list[nn.Parameter]:
        """Parameters that belong to one domain only (its teacher head and classifiers)."""
        return self.method.domain_parameters(self.heads, domain)
