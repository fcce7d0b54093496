"""UDON losses against hand-computed values, and where their gradients go."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uniret.errors import UniretError
from uniret.train.config import TrainConfig
from uniret.train.losses import (
    classification_loss,
    classifier_only_losses,
    logit_distillation,
    relational_distillation,
    udon_losses,
)
from uniret.train.methods import METHODS
from uniret.train.model import CosineClassifier, TrainingModel


def training_model(embedder, num_classes, method="udon", **config):
    """A TrainingModel of ``method`` (a registry name) on ``embedder``."""
    return TrainingModel(embedder, METHODS[method](TrainConfig(method=method, **config), num_classes))


def test_classification_loss_hand_computed():
    cos = torch.tensor([[0.5, 0.0], [0.0, 0.25]])
    labels = torch.tensor([0, 0])
    # scale 16 -> logits [[8, 0], [0, 4]]; CE = log(1 + e^-8) and log(1 + e^4)
    expected = (math.log(1 + math.exp(-8)) + math.log(1 + math.exp(4))) / 2
    assert classification_loss(cos, labels, 16.0).item() == pytest.approx(expected, rel=1e-6)


def test_classification_loss_margin_hand_computed():
    """CosFace: the margin lowers the target cosine only; margin 0 is the plain loss."""
    cos = torch.tensor([[0.5, 0.0], [0.0, 0.25]])
    labels = torch.tensor([0, 1])
    # margin 0.25, scale 16 -> logits [[4, 0], [0, 0]]; CE = log(1 + e^-4) and log(2)
    expected = (math.log(1 + math.exp(-4)) + math.log(2)) / 2
    assert classification_loss(cos, labels, 16.0, 0.25).item() == pytest.approx(expected, rel=1e-6)
    assert classification_loss(cos, labels, 16.0, 0.0).item() == classification_loss(cos, labels, 16.0).item()


def test_margin_reaches_every_method_and_is_checked():
    out = {"student_cosines": torch.tensor([[0.5, 0.0]]), "teacher_cosines": torch.tensor([[0.5, 0.0]]),
           "student": F.normalize(torch.ones(1, 2), dim=1), "teacher": F.normalize(torch.ones(1, 2), dim=1)}
    labels = torch.tensor([0])
    plain = classifier_only_losses(out, labels, cls_scale=16.0)["loss"]
    with_margin = classifier_only_losses(out, labels, cls_scale=16.0, cls_margin=0.25)["loss"]
    assert with_margin.item() == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5) and with_margin > plain
    udon = udon_losses(out, labels, cls_scale=16.0, cls_margin=0.25)
    assert udon["cls_teacher"].item() == pytest.approx(with_margin.item(), rel=1e-5)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(UniretError, match="cls_margin"):
            TrainConfig(data="bench.lmdb", out="run", cls_margin=bad).validate()


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
    heads = model.heads
    return {
        "teacher": [p.grad for p in list(heads.teacher_heads.parameters()) + list(heads.teacher_classifiers.parameters())],
        "student_head": [p.grad for p in model.embedder.head.parameters()],
        "student_clf": [p.grad for p in heads.student_classifiers[0].parameters()],
        "backbone": [p.grad for p in model.embedder.backbone.parameters()],
    }


def nonzero(grads):
    return all(g is not None and g.abs().sum().item() > 0 for g in grads)


def absent(grads):
    return all(g is None or g.abs().sum().item() == 0 for g in grads)


def test_gradient_flow_distillation_reaches_student_and_backbone_not_teacher():
    torch.manual_seed(0)
    model = training_model(StubEmbedder(), [5, 3], teacher_dim=6)
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
    teacher_domain0 = list(model.heads.teacher_heads[0].parameters()) + list(model.heads.teacher_classifiers[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher_domain0)
    assert absent(g["student_head"]) and nonzero(g["backbone"])
    # the other domain's heads get nothing from a domain-0 batch
    g = grads_after(model, udon_losses(model(x, 0), y)["loss"])
    assert all(p.grad is None for p in model.domain_parameters(1))


def test_ujc_offsets_labels_into_joint_classifier():
    model = training_model(StubEmbedder(), [5, 3, 2], method="ujc")
    assert len(model.heads.student_classifiers) == 1 and not model.heads.teacher_heads
    assert model.heads.student_classifiers[0].weight.shape[0] == 10
    assert model.method.classifier_labels(2, torch.tensor([0, 1])).tolist() == [8, 9]
    assert model(torch.randn(2, 6), 1)["student_cosines"].shape == (2, 10)
    assert model.domain_parameters(1) == []  # the joint classifier belongs to every domain


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
    model = training_model(embedder, [3], teacher_dim=6)
    out = model(torch.randn(5, 6), 0)
    assert len(out["student_prefix_cosines"]) == 1 and out["student_prefix_cosines"][0].shape == (5, 3)
    full_only = classification_loss(out["student_cosines"], torch.tensor([0, 1, 2, 0, 1]))
    with_prefix = udon_losses(out, torch.tensor([0, 1, 2, 0, 1]))["cls_student"]
    assert with_prefix.item() != pytest.approx(full_only.item())


def test_loss_weights_are_normalised_by_their_sum():
    """As the reference: L = sum w_i L_i / sum w_i, so zeroing one weight averages the other three."""
    out = {
        "teacher_cosines": torch.tensor([[0.5, 0.0], [0.0, 0.25]]),
        "student_cosines": torch.tensor([[0.25, 0.0], [0.0, 0.5]]),
        "student": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "teacher": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
    }
    labels = torch.tensor([0, 1])
    full = udon_losses(out, labels)
    three = (full["cls_teacher"] + full["cls_student"] + full["logit"]).item() / 3
    for weights in ((1.0, 1.0, 1.0, 0.0), (0.25, 0.25, 0.25, 0.0), (3.0, 3.0, 3.0, 0.0)):
        assert udon_losses(out, labels, weights=weights)["loss"].item() == pytest.approx(three, rel=1e-6)
    # unequal weights: a weighted mean, not a weighted sum
    got = udon_losses(out, labels, weights=(2.0, 1.0, 1.0, 0.0))["loss"].item()
    assert got == pytest.approx((2 * full["cls_teacher"] + full["cls_student"] + full["logit"]).item() / 4, rel=1e-6)


def test_distillation_can_stop_at_the_backbone():
    """distill_to_backbone=False: L_log and L_rel still train the student head and classifier but send
    nothing into the backbone; the student's own classification loss still reaches it."""
    torch.manual_seed(0)
    model = training_model(StubEmbedder(), [5, 3], teacher_dim=6, distill_to_backbone=False)
    x = torch.randn(8, 6)
    y = torch.randint(0, 5, (8,))
    for name in ("logit", "relational"):
        g = grads_after(model, udon_losses(model(x, 0), y)[name])
        assert absent(g["backbone"]) and absent(g["teacher"]), name
        assert nonzero(g["student_head"]), name
    assert nonzero(grads_after(model, udon_losses(model(x, 0), y)["cls_student"])["backbone"])
    # the values are those of the default model: only where the gradients go differs
    torch.manual_seed(0)
    default = training_model(StubEmbedder(), [5, 3], teacher_dim=6)
    a, b = udon_losses(model(x, 0), y), udon_losses(default(x, 0), y)
    assert all(a[k].item() == pytest.approx(b[k].item(), rel=1e-6) for k in a)


def test_teacher_heads_start_lecun_normal_with_zero_bias():
    torch.manual_seed(0)
    model = training_model(StubEmbedder(feature_dim=400), [5, 3], teacher_dim=300)
    for head in model.heads.teacher_heads:
        assert torch.count_nonzero(head.bias) == 0
        assert head.weight.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.05)  # fan-in variance
        assert head.weight.abs().max().item() <= 2 / 0.87962566 / math.sqrt(400) + 1e-6  # truncated at 2 std
    # untrained teacher embeddings of unrelated features are not pulled into one direction by a bias
    e = F.normalize(model.heads.teacher_heads[0](F.normalize(torch.randn(64, 400), dim=1)), dim=1)
    cos = e @ e.T
    assert cos[~torch.eye(64, dtype=torch.bool)].mean().abs().item() < 0.05


def test_a_fifth_method_is_one_class(demo_root, tmp_path):
    """A method registered in METHODS is trained by the unchanged trainer and config checks."""
    from uniret.train import methods
    from uniret.train.trainer import train

    @methods.register
    class Prototypes(methods.Uscrr):
        """USCRR with the sampler following the student loss of a twice-scaled softmax."""

        name = "test-prototypes"
        help = "test only"
        default_sampler = "uniform"

        def losses(self, out, labels, ctx):
            return {"loss": classification_loss(out["student_cosines"], labels, 2 * self.config.cls_scale),
                    "cls_student": classification_loss(out["student_cosines"], labels, self.config.cls_scale)}

    try:
        cfg = TrainConfig(data=str(demo_root), out=str(tmp_path / "run"), method="test-prototypes",
                          backbone="timm:test_vit", image_size=32, batch_size=8, steps=2, val_every=0)
        run = train(cfg)
        header = json.loads((run / "train_config.json").read_text())
        assert header["config"]["sampler"] == "uniform" and (run / "model" / "model.safetensors").is_file()
    finally:
        methods.METHODS.pop("test-prototypes")
