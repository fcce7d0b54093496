"""The training-time model: the inference embedder plus per-domain teachers and cosine classifiers.

``TrainingModel`` wraps a :class:`~uniret.embed.model.UniversalEmbedder` (backbone + universal
student head, the only part exported for inference) and adds what only training needs:

- udon: per domain a teacher head (Linear -> teacher_dim, L2) and two cosine classifiers
  (teacher and student, no bias, prototypes re-normalised at every forward);
- uscrr / specialist: one student cosine classifier per domain;
- ujc: one joint student classifier over the classes of all domains (labels offset per domain).

Heads live in ``nn.ModuleList``s indexed by domain position (domain names may contain dots).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


class TrainingModel(nn.Module):
    """Backbone + student head (the embedder) + method-specific teachers and classifiers."""

    def __init__(self, embedder: nn.Module, num_classes: list[int], method: str = "udon", teacher_dim: int = 256):
        super().__init__()
        self.embedder = embedder
        self.method = method
        self.num_classes = list(num_classes)
        feature_dim = embedder.head.in_features
        dim = embedder.head.out_features
        self.teacher_heads = nn.ModuleList()
        self.teacher_classifiers = nn.ModuleList()
        self.student_classifiers = nn.ModuleList()
        if method == "udon":
            for c in self.num_classes:
                self.teacher_heads.append(nn.Linear(feature_dim, teacher_dim))
                self.teacher_classifiers.append(CosineClassifier(teacher_dim, c))
        if method == "ujc":
            self.student_classifiers.append(CosineClassifier(dim, sum(self.num_classes)))
        else:
            for c in self.num_classes:
                self.student_classifiers.append(CosineClassifier(dim, c))
        offsets = [0]
        for c in self.num_classes[:-1]:
            offsets.append(offsets[-1] + c)
        self.label_offsets = offsets

    def joint_labels(self, domain: int, labels: torch.Tensor) -> torch.Tensor:
        """Labels in the classifier's space (offset into the joint classifier for ujc)."""
        return labels + self.label_offsets[domain] if self.method == "ujc" else labels

    def forward(self, images: torch.Tensor, domain: int) -> dict[str, torch.Tensor]:
        features = self.embedder.features(images)  # e_b, L2-normalised
        student = self.embedder.embed_features(features)  # e_u = normalize(head(e_b))
        classifier = self.student_classifiers[0 if self.method == "ujc" else domain]
        out = {"student": student, "student_cosines": classifier(student)}
        nested = getattr(getattr(self.embedder, "config", None), "nested_dims", None) or []
        if len(nested) > 1:  # the last nested size is the full embedding, already above
            out["student_prefix_cosines"] = [classifier.prefix(student, m) for m in nested[:-1]]
        if self.method == "udon":
            teacher = F.normalize(self.teacher_heads[domain](features), dim=-1)  # e_t
            out["teacher"] = teacher
            out["teacher_cosines"] = self.teacher_classifiers[domain](teacher)
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        """Student head, teacher heads and every classifier: the lr-1e-3 group."""
        params = list(self.embedder.head.parameters())
        for module in (self.teacher_heads, self.teacher_classifiers, self.student_classifiers):
            params.extend(module.parameters())
        return params

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.embedder.backbone.parameters())

    def domain_parameters(self, domain: int) -> list[nn.Parameter]:
        """Parameters that belong to one domain only (its teacher head and classifiers)."""
        params: list[nn.Parameter] = []
        if self.method == "udon":
            params.extend(self.teacher_heads[domain].parameters())
            params.extend(self.teacher_classifiers[domain].parameters())
        if self.method != "ujc":
            params.extend(self.student_classifiers[domain].parameters())
        return params
