"""UDON losses against hand-computed values, and where their gradients go."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uniret.train.losses import (
    classification_loss,
    logit_distillation,
    relational_distillation,
    udon_losses,
)
from uniret.train.model import CosineClassifier, TrainingModel


def test_classification_loss_hand_computed():
    cos = torch.tensor([[0.5, 0.0], [0.0, 0.25]])
    labels = torch.tensor([0, 0])
    # scale 16 -> logits [[8, 0], [0, 4]]; CE = log(1 + e^-8) and log(1 + e^4)
    expected = (math.log(1 + math.exp(-8)) + math.log(1 + math.exp(4))) / 2
    assert classification_loss(cos, labels, 16.0).item() == pytest.approx(expected, rel=1e-6)


def test_logit_distillation_hand_computed():
    teacher = torch.tensor([[0.1, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.1]])
    e = math.e
    pt = [e / (e + 1), 1 / (e + 1)]  # softmax([1, 0]) at T = 0.1
    # row 1: KL(pt || [.5, .5]); row 2: KL([.5, .5] || softmax([0, 1]))
    row1 = sum(p * math.log(p / 0.5) for p in pt)
    ps = [1 / (e + 1), e / (e + 1)]
    row2 = sum(0.5 * math.log(0.5 / q) for q in ps)
    got = logit_distillation(teacher, student, 0.1).item()
    assert got == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # no tau^2 factor: at T=1 the value is the plain KL of the cosines' softmax
    assert logit_distillation(teacher, teacher, 0.1).item() == pytest.approx(0.0, abs=1e-7)


def test_relational_distillation_hand_computed():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # S_u = I
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # S_t = all ones
    # (S_u - S_t)^2 = [[0, 1], [1, 0]] -> mean 0.5; B/4 = 0.5 -> 0.25
    assert relational_distillation(student, teacher, 0.25).item() == pytest.approx(0.25)
    # B = 4: the same pair twice -> mean((S_u - S_t)^2) = 0.5, B/4 = 1
    s4 = torch.cat([student, student])
    t4 = torch.cat([teacher, teacher])
    assert relational_distillation(s4, t4, 0.25).item() == pytest.approx(0.5 * 1.0)


def test_total_is_weighted_mean_of_the_four():
    out = {
        "teacher_cosines": torch.tensor([[0.5, 0.0], [0.0, 0.25]]),
        "student_cosines": torch.tensor([[0.25, 0.0], [0.0, 0.5]]),
        "student": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "teacher": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
    }
    labels = torch.tensor([0, 1])
    losses = udon_losses(out, labels)
    parts = [losses[k].item() for k in ("cls_teacher", "cls_student", "logit", "relational")]
    assert losses["loss"].item() == pytest.approx(sum(parts) / 4, rel=1e-6)
    assert losses["relational"].item() == pytest.approx(0.25)
    assert losses["cls_teacher"].item() == pytest.approx(
        (math.log(1 + math.exp(-8)) + math.log(1 + math.exp(-4))) / 2, rel=1e-5
    )


def test_cosine_classifier_renormalises_prototypes():
    clf = CosineClassifier(3, 2)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]))
    x = F.normalize(torch.tensor([[1.0, 0.0, 1.0]]), dim=1)
    assert clf(x).tolist()[0] == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-6)


class StubEmbedder(nn.Module):
    """The UniversalEmbedder contract in miniature: backbone, head, features(x), forward(x)."""

    def __init__(self, in_dim=6, feature_dim=8, dim=4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_dim, feature_dim), nn.Tanh(), nn.Linear(feature_dim, feature_dim))
        self.head = nn.Linear(feature_dim, dim)

    def features(self, x):
        return F.normalize(self.backbone(x), dim=-1)

    def embed_features(self, e_b):
        return F.normalize(self.head(e_b), dim=-1)

    def forward(self, x):
        return self.embed_features(self.features(x))


def grads_after(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        "teacher": [p.grad for p in list(model.teacher_heads.parameters()) + list(model.teacher_classifiers.parameters())],
        "student_head": [p.grad for p in model.embedder.head.parameters()],
        "student_clf": [p.grad for p in model.student_classifiers[0].parameters()],
        "backbone": [p.grad for p in model.embedder.backbone.parameters()],
    }


def nonzero(grads):
    return all(g is not None and g.abs().sum().item() > 0 for g in grads)


def absent(grads):
    return all(g is None or g.abs().sum().item() == 0 for g in grads)


def test_gradient_flow_distillation_reaches_student_and_backbone_not_teacher():
    torch.manual_seed(0)
    model = TrainingModel(StubEmbedder(), num_classes=[5, 3], method="udon", teacher_dim=6)
    x = torch.randn(8, 6)
    y = torch.randint(0, 5, (8,))
    out = model(x, 0)
    losses = udon_losses(out, y)
    for name in ("logit", "relational"):
        out = model(x, 0)
        losses = udon_losses(out, y)
        g = grads_after(model, losses[name])
        assert absent(g["teacher"]), f"{name} leaked gradient into the teacher"
        assert nonzero(g["student_head"]) and nonzero(g["backbone"]), name
        if name == "logit":
            assert nonzero(g["student_clf"])
    # teacher classification trains teacher and backbone, never the student side
    g = grads_after(model, udon_losses(model(x, 0), y)["cls_teacher"])
    teacher_domain0 = list(model.teacher_heads[0].parameters()) + list(model.teacher_classifiers[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher_domain0)
    assert absent(g["student_head"]) and nonzero(g["backbone"])
    # the other domain's heads get nothing from a domain-0 batch
    g = grads_after(model, udon_losses(model(x, 0), y)["loss"])
    assert all(p.grad is None for p in model.domain_parameters(1))


def test_ujc_offsets_labels_into_joint_classifier():
    model = TrainingModel(StubEmbedder(), num_classes=[5, 3, 2], method="ujc")
    assert len(model.student_classifiers) == 1
    assert model.student_classifiers[0].weight.shape[0] == 10
    assert model.joint_labels(2, torch.tensor([0, 1])).tolist() == [8, 9]
    assert model(torch.randn(2, 6), 1)["student_cosines"].shape == (2, 10)


def test_matryoshka_prefix_classifier_and_loss_hand_computed():
    """Nested dims: each prefix of e_u, re-normalised, against the prototypes' prefix (tied weights);
    the student loss is the mean of the full and the prefix losses."""
    from types import SimpleNamespace

    from uniret.train.losses import classifier_only_losses, student_classification_loss

    clf = CosineClassifier(4, 2)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]]))
    x = F.normalize(torch.tensor([[1.0, 1.0, 0.0, 2.0]]), dim=1)
    # prefix 2: x -> (1, 1)/sqrt2, prototypes -> (1, 0) and (0, 1)
    assert clf.prefix(x, 2).tolist()[0] == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-6)
    assert clf.prefix(x, 4).tolist()[0] == pytest.approx(clf(x).tolist()[0])
    y = torch.tensor([0])
    out = {"student_cosines": clf(x), "student_prefix_cosines": [clf.prefix(x, 2)]}
    expected = (classification_loss(clf(x), y) + classification_loss(clf.prefix(x, 2), y)) / 2
    assert student_classification_loss(out, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert classifier_only_losses(out, y)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    torch.manual_seed(0)
    embedder = StubEmbedder(dim=4)
    embedder.config = SimpleNamespace(nested_dims=[2, 4])
    model = TrainingModel(embedder, num_classes=[3], method="udon", teacher_dim=6)
    out = model(torch.randn(5, 6), 0)
    assert len(out["student_prefix_cosines"]) == 1 and out["student_prefix_cosines"][0].shape == (5, 3)
    full_only = classification_loss(out["student_cosines"], torch.tensor([0, 1, 2, 0, 1]))
    with_prefix = udon_losses(out, torch.tensor([0, 1, 2, 0, 1]))["cls_student"]
    assert with_prefix.item() != pytest.approx(full_only.item())
